# What the four custom-data configs share: the data of ../_base_/datasets/custom.py (classes, palette, ignore
# index, reduce_zero_label, folders) sizes both heads and the padding; the ADE20K recipe over 40k iterations.
# Each upernet_mpvit_<variant>_custom.py adds its backbone and head widths. See "Your own data" in
# semantic_segmentation/README.md.
_base_ = [
    '../_base_/models/upernet_mpvit.py', '../_base_/datasets/custom.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_40k.py'
]
custom_imports = dict(imports=['mpvit.mmseg'], allow_failed_imports=False)
model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}, seg_pad_val={{_base_.ignore_index}}),
    decode_head=dict(num_classes={{_base_.num_classes}}, ignore_index={{_base_.ignore_index}}),
    auxiliary_head=dict(num_classes={{_base_.num_classes}}, ignore_index={{_base_.ignore_index}}))
