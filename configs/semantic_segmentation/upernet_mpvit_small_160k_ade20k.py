# UperNet + MPViT-Small, ADE20K, 160k iterations, 2 images x 8 GPUs. Reported: 48.3 mIoU (single scale).
_base_ = [
    '_base_/models/upernet_mpvit.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['mpvit.mmseg'], allow_failed_imports=False)
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        model_name='mpvit_small',
        drop_path_rate=0.2,
        # ImageNet weights of the authors (any released MPViT checkpoint works).
        init_cfg=dict(type='Pretrained', checkpoint='zoo:mpvit_small')),
    decode_head=dict(in_channels=[128, 216, 288, 288], num_classes=150),
    auxiliary_head=dict(in_channels=288, num_classes=150))
train_dataloader = dict(batch_size=2)
