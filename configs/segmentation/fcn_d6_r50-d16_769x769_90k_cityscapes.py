# Cityscapes (SlotCon Sec. 4.2, MoCo's protocol): FCN-16s as for VOC (dilation-6 head, no auxiliary
# head), train_fine 90k iterations at 769x769, total batch 16, SyncBN; mIoU on val_fine with sliding
# 769x769 windows (stride 513). Matches SlotCon's published config (2 GPUs x 8).
_base_ = [
    './_base_/models/fcn_r50.py', './_base_/datasets/cityscapes_769x769.py',
    './_base_/default_runtime.py', './_base_/schedules/step_90k.py',
]
total_batch_size = 16
crop_size = (769, 769)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1)),
    decode_head=dict(channels=256, num_convs=2, concat_input=False, dropout_ratio=0.0,
                     dilation=6, num_classes=19, align_corners=True),
    auxiliary_head=None,
    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))
