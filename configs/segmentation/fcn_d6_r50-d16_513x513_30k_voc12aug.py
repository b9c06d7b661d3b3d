# PASCAL VOC 2012 aug (SlotCon Sec. 4.2, MoCo's protocol): FCN-16s on a ResNet-50 whose conv5 uses
# stride 1 / dilation 2, two 3x3 convs of 256 channels with dilation 6 (DeepLab's large field of view),
# no auxiliary head, train_aug 30k iterations at 513x513, total batch 16, SyncBN; mIoU on val2012.
# Matches SlotCon's published config (fcn_d6_r50-d16_513x513_30k_voc12aug_moco.py, 2 GPUs x 8).
_base_ = [
    './_base_/models/fcn_r50.py', './_base_/datasets/voc12aug_513x513.py',
    './_base_/default_runtime.py', './_base_/schedules/step_30k.py',
]
total_batch_size = 16  # split over the processes by the entry point
crop_size = (513, 513)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1)),
    decode_head=dict(channels=256, num_convs=2, concat_input=False, dropout_ratio=0.0,
                     dilation=6, num_classes=21, align_corners=True),
    auxiliary_head=None)
