# CPU smoke variant of fcn_d6_r50-d16_513x513_30k_voc12aug.py: same model and dataset layout,
# BN, 64x64 crops, 2 iterations, batch 2.
_base_ = './fcn_d6_r50-d16_513x513_30k_voc12aug.py'
# Shared by the smoke variants: plain BN, batch 2, 2 iterations, evaluation and a checkpoint at the end.
bn = dict(type='BN', requires_grad=True)
total_batch_size = 2
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = [dict(type='MultiStepLR', by_epoch=False, begin=0, end=2, milestones=[1], gamma=0.1)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=1))
crop_size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(norm_cfg=bn),
    decode_head=dict(norm_cfg=bn))
train_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(datasets=[
        dict(type='PascalVOCDataset', data_root='data/VOCdevkit/VOC2012',
             data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
             ann_file='ImageSets/Segmentation/train.txt', pipeline=train_pipeline),
        dict(type='PascalVOCDataset', data_root='data/VOCdevkit/VOC2012',
             data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClassAug'),
             ann_file='ImageSets/Segmentation/aug.txt', pipeline=train_pipeline),
    ]))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
