# UperNet + MPViT-Small on your own data (../_base_/datasets/custom.py): the recipe of
# upernet_mpvit_small_160k_ade20k.py over 40k iterations (_upernet_custom.py).
_base_ = ['./_upernet_custom.py']
model = dict(
    backbone=dict(
        model_name='mpvit_small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_small')),
    decode_head=dict(in_channels=[128, 216, 288, 288]),
    auxiliary_head=dict(in_channels=288))
