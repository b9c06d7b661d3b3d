"""Downstream transfer: Detectron2 detection and MMSegmentation segmentation protocols."""
