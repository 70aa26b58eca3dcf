# The authors' schedule (mmseg 0.x): AdamW 6e-5, weight decay 0.01 on every parameter; poly decay (power 1,
# min 0) over all 160k iterations, times a linear warm-up factor (1e-6 -> 1) over the first 1500:
#   lr(i) = 6e-5 * (1 - i / 160000) * (1e-6 + (1 - 1e-6) * min(i, 1500) / 1500).
# mmengine multiplies the factors of schedulers active at the same iteration, which gives that product;
# its schedulers reach their end value at iteration `end - 1`, hence the + 1 below.
# Without paramwise_cfg, model.parameters() yields each shared CPE / CRPE parameter once.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500 + 1),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=160000 + 1, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'))
# No SegVisualizationHook: it would draw nothing (and say so) unless tools/test.py --show-dir adds it.
