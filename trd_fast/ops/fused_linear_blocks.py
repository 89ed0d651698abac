"""The row-block engine of the fused linear loss: hidden states through the LM heads, R rows at a time.

Maths. For the rows of a block, each model's logits are z = cap(a (h W^T + b)) with cap(y) = c tanh(y / c)
(softcap c; the identity without one), formed over the common columns j < Vc = min(V_s, V_t) only: the other
columns carry no probability and get zero gradient. The backend's divergence kernels (trd_fast::divergence
and its backward, OpSet) give l_r and, for an upstream gradient g_r = d loss / d l_r, dz_rj = d loss / d z_s,rj,
written over the student tile. With e = dz cap'(y), cap'(y) = 1 - tanh^2 = 1 - (z / c)^2:
    d loss / d h_s = a e W_s      d loss / d W_s = a e^T h_s      d loss / d b_s = a sum_r e_r
Top-k with a dense teacher and a SparseTeacher reduce to k ids per row: the teacher's top-k is taken on its
[R, Vc] tile, the student's logits are formed only at the ids, from its gathered head rows W_s[ids] [R, k, H_s],
and its gradients scatter back to those rows. An empty slot (-1) is -inf on both sides (probability 0).

Memory: the tiles of one block ([R, Vc] per model, or [R, k, H_s] gathered rows), with R from a byte budget; nothing
of size [N, V]. On CPU the dense tiles' buffer is kept for the next call (fused_linear_tiles.py). Matmuls accumulate
in fp32 (fp64 for float64 inputs) and write fp32 (fp64) tiles; on CPU a bf16/fp16 head is converted to fp32 once per
call, on CUDA the matmuls read it as it is (fp32 output).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from trd_fast.ops.fused_linear_tiles import tile_buffer
from trd_fast.ops.registry import STATS_DTYPE, OpSet

# Bytes of tiles one block may use, per device type (Problem.row_block turns it into R rows).
TILE_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 512 << 20}
DEFAULT_TILE_BUDGET = 256 << 20
REDUCED = (torch.bfloat16, torch.float16)


def operand_dtype(x: torch.Tensor, compute: torch.dtype) -> torch.dtype:
    """The dtype a matmul reads x in: as it is for bf16/fp16 on CUDA (fp32 output), else the compute dtype."""
    return x.dtype if x.device.type == "cuda" and x.dtype in REDUCED and compute == torch.float32 else compute


def matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0,
           add: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """out <- alpha a b + beta add (add = None: out is overwritten), accumulated and written in out's dtype."""
    extra = {"out_dtype": out.dtype} if a.dtype != out.dtype else {}
    return torch.addmm(out if add is None else add, a, b, beta=beta if add is not None else 0.0, alpha=alpha,
                       out=out, **extra)


@dataclass(frozen=True)
class Head:
    """One model's LM head over N rows: z = cap(a (h W^T + b))."""

    hidden: torch.Tensor  # [N, H] any float dtype (converted per block)
    weight: torch.Tensor  # [V, H] in its operand dtype (see operand_dtype)
    bias: torch.Tensor | None  # [V] in the compute dtype
    scale: float  # a
    softcap: float | None  # c, or None

    @staticmethod
    def of(hidden, weight, bias, scale, softcap, compute: torch.dtype) -> "Head":
        weight = weight.detach().to(operand_dtype(weight, compute))
        bias = None if bias is None else bias.detach().to(compute)
        return Head(hidden.detach(), weight, bias, scale, softcap)

    def rows(self, rows: slice) -> torch.Tensor:
        """The block's hidden states [R, H] in the weight's operand dtype."""
        return self.hidden[rows].to(self.weight.dtype)

    def project(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """out [R, C] <- z over the first C columns."""
        columns = out.shape[1]
        bias = None if self.bias is None else self.bias[:columns]
        matmul(out, self.rows(rows), self.weight[:columns].t(), alpha=self.scale, add=bias, beta=self.scale)
        return self.cap_(out)

    def project_ids(self, rows: slice, ids: torch.Tensor, dtype: torch.dtype):
        """z at ids [R, k] (in [0, V)) -> (z [R, k], the gathered head rows [R, k, H]), both in `dtype`."""
        gathered = self.weight.index_select(0, ids.flatten()).view(*ids.shape, -1).to(dtype)
        z = torch.bmm(gathered, self.hidden[rows].to(dtype).unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            z = z + self.bias[ids]
        return self.cap_(z.mul_(self.scale)), gathered

    def cap_(self, z: torch.Tensor) -> torch.Tensor:
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def cap_derivative_(self, z: torch.Tensor) -> torch.Tensor:
        """z (capped logits) <- cap'(y) = 1 - (z / c)^2, in place."""
        return z.div_(self.softcap).square_().neg_().add_(1)


@dataclass(frozen=True)
class Problem:
    """Everything a block needs: both heads (or sparse targets), the divergence and how blocks are cut."""

    student: Head
    teacher: Head | None  # None with a SparseTeacher
    sparse_ids: torch.Tensor | None  # [N, k] int64, -1 = empty slot (SparseTeacher)
    sparse_logits: torch.Tensor | None  # [N, k] teacher log-probs in the compute dtype (SparseTeacher)
    top_k: int | None  # dense teacher: its top-k ids per row (k <= columns)
    kind: int  # divergence kernel code
    beta: float
    temperature: float
    columns: int  # Vc, the common vocabulary (V_s with a SparseTeacher)
    dtype: torch.dtype  # compute dtype of the tiles: float32 or float64
    ops: OpSet  # the backend's divergence kernels

    @property
    def rows(self) -> int:
        return self.student.hidden.shape[0]

    @property
    def support_width(self) -> int:
        """Columns of the kernels' rows: Vc, or k ids."""
        if self.sparse_ids is not None:
            return self.sparse_ids.shape[1]
        return self.top_k if self.top_k is not None else self.columns

    @property
    def gathers(self) -> bool:
        return self.sparse_ids is not None or self.top_k is not None

    def row_block(self, budget: int) -> int:
        """R: rows whose tiles fit `budget` bytes (at least 1), evened out over the blocks N needs (no small
        last block: a matmul over few rows runs well below the BLAS rate)."""
        item = torch.finfo(self.dtype).bits // 8
        width = self.support_width
        if self.gathers:  # gathered rows and their scattered gradient, the student's logits at the ids
            per_row = 2 * width * self.student.hidden.shape[1] + 3 * width
            per_row += 0 if self.teacher is None else self.columns  # the teacher's tile for its top-k
        else:  # both tiles, and a separate gradient tile when the student's cap derivative needs z
            per_row = (2 + (self.student.softcap is not None)) * width
        limit = max(1, budget // (per_row * item))
        blocks = max(1, -(-self.rows // limit))
        return max(1, -(-self.rows // blocks))


@dataclass
class Gradients:
    """Accumulators in the compute dtype (None: not wanted)."""

    hidden: torch.Tensor | None  # [N, H_s], each block writes its own rows
    weight: torch.Tensor | None  # [V_s, H_s]
    bias: torch.Tensor | None  # [V_s]
    fresh_weight: bool = False  # weight[:Vc] not written yet: the first dense block overwrites instead of adding

    @staticmethod
    def allocate(problem: Problem, wanted: list[bool]) -> "Gradients":
        """The wanted accumulators. The head's is not zero-filled where the first dense block overwrites it
        (a whole pass over a fresh [V, H] saved); rows j >= Vc and scattered (gathered) gradients start at 0."""
        head, dtype = problem.student, problem.dtype
        hidden = torch.empty(head.hidden.shape, dtype=dtype, device=head.hidden.device) if wanted[0] else None
        fresh = wanted[1] and not problem.gathers and problem.rows > 0
        weight = None
        if wanted[1]:
            weight = torch.empty(head.weight.shape, dtype=dtype, device=head.weight.device)
            (weight[problem.columns:] if fresh else weight).zero_()
        bias = torch.zeros(head.weight.shape[:1], dtype=dtype, device=head.weight.device) \
            if wanted[2] and head.bias is not None else None
        return Gradients(hidden, weight, bias, fresh)


@dataclass
class Block:
    """One block's kernel rows over the support."""

    rows: slice
    student: torch.Tensor  # [R, C] z_s (the gradient after the backward kernel)
    teacher: torch.Tensor  # [R, C] z_t
    ids: torch.Tensor | None = None  # [R, k] support ids clamped to >= 0 (None: the common columns)
    empty: torch.Tensor | None = None  # [R, k] bool, empty slots
    gathered: torch.Tensor | None = None  # [R, k, H_s] the student's head rows at ids


@dataclass
class Saved:
    """What the backward of the values op needs per row (O(N) besides the inputs)."""

    values: torch.Tensor  # [N] fp32
    stats: torch.Tensor  # [N, 3] the kernels' row statistics
    ids: torch.Tensor  # [N, k] int64 support ids, -1 = empty ([N, 0] for the dense common columns)
    teacher: torch.Tensor  # [N, k] the teacher's logits at ids, -inf where empty ([N, 0] likewise)


class Engine:
    """Runs the blocks of one problem, reusing one set of tiles."""

    def __init__(self, problem: Problem, budget: int):
        self.problem = problem
        self.block = problem.row_block(budget)
        self.student_tile: torch.Tensor | None = None  # [R, Vc] while a pass runs (dense student)
        self.teacher_tile: torch.Tensor | None = None  # [R, Vc] while a pass runs (dense teacher)

    @contextmanager
    def tiles(self):
        """Sets the pass's tiles, views of one flat buffer (fused_linear_tiles: kept across calls on CPU)."""
        p = self.problem
        shapes = [(self.block, p.columns) if wanted else None
                  for wanted in (not p.gathers, p.teacher is not None)]
        size = self.block * p.columns
        with tile_buffer(size * sum(s is not None for s in shapes), p.dtype, p.student.hidden.device) as flat:
            views = iter(flat.split(size))
            self.student_tile, self.teacher_tile = (None if s is None else next(views).view(s) for s in shapes)
            try:
                yield
            finally:
                self.student_tile = self.teacher_tile = None

    def blocks(self):
        for start in range(0, self.problem.rows, self.block):
            yield slice(start, min(start + self.block, self.problem.rows))

    # ------------------------------------------------------------------------------------------- support

    def support(self, rows: slice, saved: Saved | None = None) -> Block:
        """The block's student and teacher logits over the support (from `saved` ids when given)."""
        p, n = self.problem, rows.stop - rows.start
        if not p.gathers:
            return Block(rows, p.student.project(rows, self.student_tile[:n]),
                         p.teacher.project(rows, self.teacher_tile[:n]))
        if saved is not None:
            ids, teacher = saved.ids[rows], saved.teacher[rows]
        elif p.sparse_ids is not None:
            ids, teacher = p.sparse_ids[rows], p.sparse_logits[rows]
        else:
            tile = p.teacher.project(rows, self.teacher_tile[:n])
            teacher, ids = tile.topk(p.top_k, dim=-1, sorted=False)  # [R, k]
        empty = ids < 0
        safe = ids.clamp(min=0)
        student, gathered = p.student.project_ids(rows, safe, p.dtype)
        minus_inf = torch.full((), float("-inf"), dtype=p.dtype, device=student.device)
        return Block(rows, torch.where(empty, minus_inf, student), torch.where(empty, minus_inf, teacher.to(p.dtype)),
                     safe, empty, gathered)

    # ------------------------------------------------------------------------------------------- kernels

    def divergence(self, block: Block):
        """l [R] fp32 and the row statistics [R, 3] of the block."""
        p = self.problem
        value, stats = p.ops.op("divergence")(block.student.unsqueeze(0), block.teacher.unsqueeze(0), p.kind,
                                              p.beta, p.temperature, False)
        return value[0], stats[0]

    def accumulate(self, block: Block, grad_value: torch.Tensor, value: torch.Tensor, stats: torch.Tensor,
                   grads: Gradients) -> None:
        """Adds the block's gradients for the upstream gradient grad_value [R] (fp32) to `grads`."""
        p, head = self.problem, self.problem.student
        args = (grad_value.unsqueeze(0), block.student.unsqueeze(0), block.teacher.unsqueeze(0),
                value.unsqueeze(0), stats.unsqueeze(0), p.kind, p.beta, p.temperature)
        if head.softcap is None:
            p.ops.op("divergence_backward_")(*args)
            e = block.student
        else:  # the cap derivative needs z: the gradient goes to a new tile
            e = p.ops.op("divergence_backward")(*args)[0].mul_(head.cap_derivative_(block.student))
        if block.ids is None:
            self._dense_gradients(block, e, grads)
        else:
            self._gathered_gradients(block, e.masked_fill_(block.empty, 0), grads)

    def _dense_gradients(self, block: Block, e: torch.Tensor, grads: Gradients) -> None:
        head, columns = self.problem.student, e.shape[1]
        operand = e.to(head.weight.dtype)
        if grads.hidden is not None:
            matmul(grads.hidden[block.rows], operand, head.weight[:columns], alpha=head.scale)
        if grads.weight is not None:
            rows = grads.weight[:columns]
            matmul(rows, operand.t(), head.rows(block.rows), alpha=head.scale,
                   add=None if grads.fresh_weight else rows, beta=1.0)
            grads.fresh_weight = False
        if grads.bias is not None:
            grads.bias[:columns].add_(e.sum(0), alpha=head.scale)

    def _gathered_gradients(self, block: Block, e: torch.Tensor, grads: Gradients) -> None:
        head, ids = self.problem.student, block.ids.flatten()
        e = e.mul_(head.scale)  # [R, k]
        if grads.hidden is not None:
            grads.hidden[block.rows] = torch.bmm(e.unsqueeze(1), block.gathered).squeeze(1)
        if grads.weight is not None:
            hidden = head.hidden[block.rows].to(e.dtype)
            grads.weight.index_add_(0, ids, (e.unsqueeze(-1) * hidden.unsqueeze(1)).flatten(0, 1))
        if grads.bias is not None:
            grads.bias.index_add_(0, ids, e.flatten())

    # ------------------------------------------------------------------------------------------- passes

    def forward(self, grads: Gradients | None = None,
                upstream: Callable[[slice, torch.Tensor], torch.Tensor] | None = None) -> Saved:
        """Values and statistics of every row; with `grads`, also their gradients for the upstream gradient
        upstream(rows, values of those rows) [R] fp32, known during the forward (a scalar loss)."""
        p = self.problem
        device = p.student.hidden.device
        values = torch.empty(p.rows, dtype=torch.float32, device=device)
        stats = torch.empty((p.rows, 3), dtype=STATS_DTYPE, device=device)
        width = p.support_width if p.gathers else 0
        ids = torch.empty((p.rows, width), dtype=torch.int64, device=device)
        teacher = torch.empty((p.rows, width), dtype=p.dtype, device=device)
        with self.tiles():
            for rows in self.blocks():
                block = self.support(rows)
                value, stat = self.divergence(block)
                values[rows], stats[rows] = value, stat
                if width:
                    ids[rows] = torch.where(block.empty, -1, block.ids)
                    teacher[rows] = block.teacher
                if grads is not None:
                    self.accumulate(block, upstream(rows, value), value, stat, grads)
        return Saved(values, stats, ids, teacher)

    def backward(self, grad_values: torch.Tensor, saved: Saved, grads: Gradients) -> None:
        """Gradients for a per-row upstream gradient grad_values [N] fp32: the logits are formed again."""
        with self.tiles():
            for rows in self.blocks():
                block = self.support(rows, saved if self.problem.gathers else None)
                self.accumulate(block, grad_values[rows], saved.values[rows], saved.stats[rows], grads)
