# Cityscapes (SlotCon Sec. 4.2, MoCo's protocol): FCN-16s as for VOC (dilation-6 head, no auxiliary
# head), train_fine 90k iterations at 769x769, total batch 16, SyncBN; mIoU on val_fine with sliding
# 769x769 windows (stride 513). Matches SlotCon's published config (2 GPUs x 8).
# This is the config `python -m slurm collect` compares with the paper; the variant with the
# pretraining's normalisation is fcn_d6_r50-d16_769x769_90k_cityscapes_imagenetnorm.py.
_base_ = [
    './_base_/models/fcn_r50.py', './_base_/datasets/cityscapes_769x769.py',
    './_base_/default_runtime.py', './_base_/schedules/step_90k.py',
]
total_batch_size = 16
crop_size = (769, 769)
# As published, not as intended: the authors' Cityscapes dataset config (cityscapes_769x769_moco) normalises
# the 0-255 pixels with the 0-1 ImageNet statistics, as for VOC (see fcn_d6_r50-d16_513x513_30k_voc12aug.py);
# the published Cityscapes mIoU was measured this way. Padding: 0 after normalisation, 255 for labels.
data_preprocessor = dict(
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1)),
    decode_head=dict(channels=256, num_convs=2, concat_input=False, dropout_ratio=0.0,
                     dilation=6, num_classes=19, align_corners=True),
    auxiliary_head=None,
    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))
