# fcn_d6_r50-d16_769x769_90k_cityscapes.py with the normalisation the backbone was pretrained with:
# ImageNet statistics in the 0-255 scale of the loaded pixels (as ADE20K and Detectron2 already use).
# Everything else is the published protocol. Its mIoU is not comparable with the paper's Cityscapes
# number, which was measured with the published config's 0-1 statistics on 0-255 pixels; `slurm collect`
# never uses this file. Run it with --config to measure what the normalisation costs or gains.
_base_ = './fcn_d6_r50-d16_769x769_90k_cityscapes.py'
data_preprocessor = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
model = dict(data_preprocessor=data_preprocessor)
