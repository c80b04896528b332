"""Knowledge distillation: vocab-parallel KL, frozen TP-sharded teacher, student init, driver."""

from mtnlg.distillation.kd_loss import KD_MODES, distillation_loss, vocab_parallel_kl
from mtnlg.distillation.student import DistillStudent, KDConfig

__all__ = ["KD_MODES", "DistillStudent", "KDConfig", "distillation_loss", "vocab_parallel_kl"]
