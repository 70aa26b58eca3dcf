# UperNet + MPViT-Base, ADE20K, 160k iterations, 2 images x 8 GPUs. Reported: 50.3 mIoU (single scale).
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
        arch='base',
        drop_path_rate=0.4,
        # ImageNet weights of the authors (any released MPViT checkpoint works).
        init_cfg=dict(type='Pretrained', checkpoint='https://dl.dropbox.com/s/la8w31m0apj2830/mpvit_base.pth')),
    decode_head=dict(in_channels=[224, 368, 480, 480], num_classes=150),
    auxiliary_head=dict(in_channels=480, num_classes=150))
train_dataloader = dict(batch_size=2)
