# UperNet + MPViT-Base, ADE20K, 160k iterations, 2 images x 8 GPUs. Reported: 50.3 mIoU (single scale).
# Same recipe as MPViT-S; wider backbone, drop path 0.4.
_base_ = ['./upernet_mpvit_small_160k_ade20k.py']
model = dict(
    backbone=dict(
        model_name='mpvit_base',
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_base')),
    decode_head=dict(in_channels=[224, 368, 480, 480]),
    auxiliary_head=dict(in_channels=480))
