"""DeepSeek-V3 load balancing for training: the aux-loss-free bias update and the sequence-wise loss.

    router = RouterMonitor(module, balance_alpha=1e-4)   # watches every Gate under module
    loss = lm_loss + router.balance_loss(n_seqs)         # after each forward (0 when alpha = 0)
    loads = router.end_step(bias_update_speed=1e-3)      # after each optimizer step: [n_gates, E]

Aux-loss-free balancing (DeepSeek-V3 paper, section 2.1.2): each expert's `e_score_correction_bias`
only shifts which experts are picked, never the gating weights; after every step it moves by
-gamma if the expert took more than the mean load and +gamma if less. It is a buffer changed under
no_grad, outside the gradient. The optional sequence-wise loss alpha * sum_i f_i * P_i (f: the
expert's share of the sequence's top-k picks, times E/k; P: its mean normalized score) keeps a single
sequence from collapsing onto few experts. The monitor observes gates through forward hooks, so the
model code is unchanged and inference never pays for it.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moela.models.layers import Gate


class RouterMonitor:
    def __init__(self, module: nn.Module, balance_alpha: float = 0.0):
        self.gates = [m for m in module.modules() if isinstance(m, Gate)]
        self.balance_alpha = balance_alpha
        self.active = True  # set False around evaluation so held-out tokens do not count
        n_experts = self.gates[0].weight.shape[0] if self.gates else 0
        self.counts = torch.zeros(len(self.gates), n_experts, dtype=torch.float64)
        self.routed: list[tuple[Gate, torch.Tensor, torch.Tensor]] = []  # (gate, logits, indices) this forward
        for i, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def record(gate: Gate, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if not self.active:
                return
            indices = output[1]
            self.counts[i] += torch.bincount(indices.flatten(), minlength=self.counts.shape[1]).cpu().double()
            if self.balance_alpha > 0:  # the scores now, while the gate's weight is whole (FSDP reshards it after)
                with torch.autocast(indices.device.type, enabled=False):
                    logits = F.linear(inputs[0].float(), gate.weight.float())  # [T, E], recomputed in fp32
                self.routed.append((gate, logits, indices))
        return record

    def balance_loss(self, n_seqs: int) -> torch.Tensor:
        """Sequence-wise balance loss of the last forward, summed over MoE layers (clears what it used)."""
        total = torch.zeros(())
        for gate, logits, indices in self.routed:
            scores = logits.sigmoid() if gate.score_func == "sigmoid" else logits.softmax(dim=-1)
            E, k = scores.shape[1], indices.shape[1]
            scores = scores.view(n_seqs, -1, E)  # [B, S, E]
            picks = F.one_hot(indices.view(n_seqs, -1, k), E).sum(dim=(1, 2)).float()  # [B, E]
            f = picks * E / (k * scores.shape[1])
            p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
            total = total + (f * p).sum(dim=-1).mean()
        self.routed.clear()
        return self.balance_alpha * total

    @torch.no_grad()
    def end_step(self, bias_update_speed: float) -> torch.Tensor:
        """Sum loads over ranks, move each noaux_tc bias toward balance, reset; return loads [n_gates, E]."""
        loads = self.counts.clone()
        if dist.is_initialized():
            on_device = loads.cuda() if dist.get_backend() == "nccl" else loads
            dist.all_reduce(on_device)
            loads = on_device.cpu()
        for gate, load in zip(self.gates, loads):
            if gate.bias is not None and bias_update_speed > 0:
                step = torch.sign(load.mean() - load) * bias_update_speed  # overloaded -> negative
                gate.bias += step.to(gate.bias)
        self.counts.zero_()
        self.routed.clear()
        return loads


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per gate: (max load - mean load) / mean load; 0 is perfectly balanced. loads: [n_gates, E]."""
    mean = loads.mean(dim=-1)
    return (loads.amax(dim=-1) - mean) / mean.clamp(min=1e-9)
