# UperNet + MPViT-Base on your own data (../_base_/datasets/custom.py): the recipe of
# upernet_mpvit_base_160k_ade20k.py over 40k iterations (_upernet_custom.py).
_base_ = ['./_upernet_custom.py']
model = dict(
    backbone=dict(
        model_name='mpvit_base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_base')),
    decode_head=dict(in_channels=[224, 368, 480, 480]),
    auxiliary_head=dict(in_channels=480))
