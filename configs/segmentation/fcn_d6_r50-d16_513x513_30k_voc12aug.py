# PASCAL VOC 2012 aug (SlotCon Sec. 4.2, MoCo's protocol): FCN-16s on a ResNet-50 whose conv5 uses
# stride 1 / dilation 2, two 3x3 convs of 256 channels with dilation 6 (DeepLab's large field of view),
# no auxiliary head, train_aug 30k iterations at 513x513, total batch 16, SyncBN; mIoU on val2012.
# Matches SlotCon's published config (fcn_d6_r50-d16_513x513_30k_voc12aug_moco.py, 2 GPUs x 8).
# This is the config `python -m slurm collect` compares with the paper; the variant with the
# pretraining's normalisation is fcn_d6_r50-d16_513x513_30k_voc12aug_imagenetnorm.py.
_base_ = [
    './_base_/models/fcn_r50.py', './_base_/datasets/voc12aug_513x513.py',
    './_base_/default_runtime.py', './_base_/schedules/step_30k.py',
]
total_batch_size = 16  # split over the processes by the entry point
crop_size = (513, 513)
# As published, not as intended: the authors' VOC dataset config (pascal_voc12_aug_513x513_moco, from
# MoCo's detectron2-style port) normalises the 0-255 pixels with the 0-1 ImageNet statistics, so inputs
# span about -2..1100 instead of -2..2.6. The published VOC mIoU was measured this way and the change
# reaches the backbone's outputs (up to ~0.3 relative on layer4), so reproducing the number needs it.
# Crops are padded with 0 after normalisation (mmseg 0.x Pad after Normalize; 1.x pads the normalised
# batch), labels with 255 (ignored).
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
                     dilation=6, num_classes=21, align_corners=True),
    auxiliary_head=None)
