# MoCo's Cityscapes schedule (SlotCon's published config): SGD lr 0.01, wd 1e-4, x0.1 at 70% and 90%, 90k iters.
optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer, clip_grad=None)
param_scheduler = [dict(type='MultiStepLR', by_epoch=False, begin=0, end=90000, milestones=[63000, 81000], gamma=0.1)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=90000, val_interval=9000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=9000, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
