# UperNet + MPViT-XSmall, ADE20K, 160k iterations, 2 images x 8 GPUs. The authors released no XS segmentation
# config or weights (no row of the paper, not in mpvit/model_zoo.json): the S / B recipe with the XS backbone.
# Drop path 0.1: the authors' dense-prediction rate for T / XS (their Detectron2 configs; those use 0.2 / 0.4
# for S / B, the same rates as their S / B UperNet configs). Their classification rate for XS is 0.0.
_base_ = ['./upernet_mpvit_small_160k_ade20k.py']
model = dict(
    backbone=dict(
        model_name='mpvit_xsmall',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_xsmall')),
    # Stage outputs: each stage projects to the next stage's width, the last keeps its own: [128, 192, 256, 256].
    decode_head=dict(in_channels=[128, 192, 256, 256]),
    auxiliary_head=dict(in_channels=256))
