default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
tta_model = dict(type='SegTTAModel')
# mpvit.mmseg.hooks: stop at the first non-finite loss, before a checkpoint of diverged weights is written; refuse
# load_from / resume weights that are not finite, hold no data or are integers where the model has floats; refuse a
# training set of which no image reads, before training starts; gradients laid out as DDP's buckets expect.
custom_hooks = [dict(type='StopOnNonFiniteLoss'), dict(type='CheckLoadedWeights'), dict(type='CheckTrainingImages'),
                dict(type='AlignGradientStrides')]
