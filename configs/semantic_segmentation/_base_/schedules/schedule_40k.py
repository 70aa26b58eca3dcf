# The ADE20K recipe (schedule_160k.py) shortened to 40k iterations, mmseg's usual length for smaller datasets
# (the custom-data configs): the same optimizer, warm-up and poly decay, now over 40k; evaluation and
# checkpoints every 4k.
_base_ = ['./schedule_160k.py']
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500 + 1),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=40000 + 1, by_epoch=False),
]
train_cfg = dict(max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=4000))
