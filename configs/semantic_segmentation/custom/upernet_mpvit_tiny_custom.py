# UperNet + MPViT-Tiny on your own data (../_base_/datasets/custom.py): the recipe of
# upernet_mpvit_tiny_160k_ade20k.py over 40k iterations (_upernet_custom.py).
_base_ = ['./_upernet_custom.py']
model = dict(
    backbone=dict(
        model_name='mpvit_tiny',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_tiny')),
    decode_head=dict(in_channels=[96, 176, 216, 216]),
    auxiliary_head=dict(in_channels=216))
