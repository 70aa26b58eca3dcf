# UperNet + MPViT-XSmall on your own data (../_base_/datasets/custom.py): the recipe of
# upernet_mpvit_xsmall_160k_ade20k.py over 40k iterations (_upernet_custom.py).
_base_ = ['./_upernet_custom.py']
model = dict(
    backbone=dict(
        model_name='mpvit_xsmall',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_xsmall')),
    decode_head=dict(in_channels=[128, 192, 256, 256]),
    auxiliary_head=dict(in_channels=256))
