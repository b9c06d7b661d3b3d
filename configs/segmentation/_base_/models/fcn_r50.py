# FCN on a torchvision-style ResNet-50 (mmseg type='ResNet': conv1/bn1 stem, the names our converter
# writes; ResNetV1c's deep stem would stay random). The backbone's init_cfg is set by
# `python -m transfer.segmentation --weights FILE` to dict(type='Pretrained', checkpoint=FILE).
# Strides/dilations here are mmseg's D8; the VOC/Cityscapes protocol configs switch to MoCo's D16.
norm_cfg = dict(type='SyncBN', requires_grad=True)  # plain BN where SyncBN cannot run (entry point)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    # ImageNet normalisation in the 0-255 scale, as in pretraining and ADE20K's published config; the VOC and
    # Cityscapes protocol configs replace it with what their published configs did (0-1 statistics).
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1),
        norm_cfg=norm_cfg,
        norm_eval=False,
        style='pytorch',
        contract_dilation=True,
        init_cfg=None),
    decode_head=dict(
        type='FCNHead',
        in_channels=2048,
        in_index=3,
        channels=512,
        num_convs=2,
        concat_input=True,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=1024,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
