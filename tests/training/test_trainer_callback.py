import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from sorsa_kernels import SORSACallback, apply_sorsa
from tests.conftest import build_tiny_llama


class _Ids(Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (n, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_callback_runs_after_clipping_and_logs_orthonormality(tmp_path, monkeypatch):
    model = build_tiny_llama()
    apply_sorsa(model, 4, progress=False)
    order = []
    import sorsa_kernels.training.callbacks as trainer_mod

    real = trainer_mod.add_regularizer_grad

    def spy(m, gamma, lr_max):
        order.append(("reg", gamma, lr_max))
        return real(m, gamma, lr_max)

    monkeypatch.setattr(trainer_mod, "add_regularizer_grad", spy)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Ids())
    real_clip = trainer._clip_grad_norm

    def clip_spy(m):
        order.append(("clip",))
        return real_clip(m)

    trainer._clip_grad_norm = clip_spy
    SORSACallback(gamma=4e-4).install(trainer)
    trainer.train()
    assert [o[0] for o in order] == ["clip", "reg", "clip", "reg"]
    assert order[1][1:] == (4e-4, 1e-3)  # lr_max defaults to the peak learning rate
    logged = [h for h in trainer.state.log_history if "orthonormality" in h]
    assert len(logged) == 2 and all(h["orthonormality"] >= 0 for h in logged)
