"""Object-centric self-supervised pretraining (SlotCon and relatives)."""
