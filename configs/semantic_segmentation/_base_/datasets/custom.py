# Your own data: the one place for classes, label layout and folders (mmseg's BaseSegDataset). Copy this file
# (or edit it), or override its top-level keys on the command line, which the tools apply to every dataloader,
# and `classes` / `ignore_index` to the heads too (mpvit/mmseg/run_config.py):
#   --cfg-options data_root=data/my_data "classes=[sky,road,car]" reduce_zero_label=False ignore_index=255
# Layout (file names pair up: img_dir/train/x.jpg <-> ann_dir/train/x.png):
#   data_root/img_dir/{train,val}/*.jpg    data_root/ann_dir/{train,val}/*.png (one channel, value = class index)
data_root = 'data/my_dataset'
classes = ('background', 'foreground')  # label value i in the PNGs is classes[i]
palette = None  # one [R, G, B] per class, or None: mmseg picks colours (they are stored in the checkpoints)
# False: value i is classes[i], ignore_index is "not labelled". True: the PNGs store 0 = "not labelled" and the
# classes as 1..N (ADE20K's layout).
reduce_zero_label = False
ignore_index = 255  # neither trained on nor scored (also the padding of crops)
img_suffix, seg_map_suffix = '.jpg', '.png'
train_prefix = dict(img_path='img_dir/train', seg_map_path='ann_dir/train')
val_prefix = dict(img_path='img_dir/val', seg_map_path='ann_dir/val')
crop_size = (512, 512)
scale = (2048, 512)  # images are resized to fit this (long, short) before cropping / evaluation

num_classes = len(classes)  # the configs of configs/semantic_segmentation/custom/ give it to both heads
dataset_type = 'BaseSegDataset'
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='CheckedLoadImage', unreadable='leave_out'),
    dict(type='LoadAnnotations'),  # reduce_zero_label comes from the dataset
    dict(type='CheckSegMap', num_classes=num_classes, ignore_index=ignore_index),
    dict(type='RandomResize', scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75, ignore_index=ignore_index),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='CheckedLoadImage', unreadable='refuse'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='CheckSegMap', num_classes=num_classes, ignore_index=ignore_index),
    dict(type='PackSegInputs'),
]
_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix=img_suffix,
                seg_map_suffix=seg_map_suffix, reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_dataset, data_prefix=train_prefix, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(_dataset, data_prefix=val_prefix, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CheckedIoUMetric', iou_metrics=['mIoU'], ignore_index=ignore_index)
test_evaluator = val_evaluator
