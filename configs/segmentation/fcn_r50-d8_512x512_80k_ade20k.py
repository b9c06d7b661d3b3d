# ADE20K (SlotCon Sec. 4.2: "the standard 80k iterations schedule of MMSegmentation"): mmseg's
# FCN R50-D8 (dilated conv4/conv5, 512-channel head, auxiliary FCN head on conv4), 512x512 crops,
# 80k iterations, poly LR, total batch 16 (SlotCon: 4 GPUs x 4), SyncBN; mIoU on validation.
_base_ = [
    './_base_/models/fcn_r50.py', './_base_/datasets/ade20k_512x512.py',
    './_base_/default_runtime.py', './_base_/schedules/poly_80k.py',
]
total_batch_size = 16
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))
