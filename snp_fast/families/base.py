"""The interface every model family implements (one folder each under snp_fast/families/).

A family knows one architecture's structure, so it builds SNP's coupled groups directly (no tracing):
its widths (a dims dataclass), how ratios become target widths, how to turn a meta-device copy of the
model into the smaller architecture, and the pieces of the pruning pipeline that depend on the
structure: what runs before the first block (prefix), the blocks as a sequence of Steps, the taps a
block's scoring and re-fit need, how its groups are selected and sliced and how it is re-fitted.
snp_fast/pipeline.py runs ONE loop over any family's steps.
"""
from abc import ABC, abstractmethod
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..settings import PruneContext
from ..slicing import Plan
from ..calib import data_config
from ..timm_config import build_timm_skeleton, resolve_timm_config

__all__ = ['Family', 'Step', 'UnsupportedModelError']


class UnsupportedModelError(TypeError):
    """The model (or one of its layers) is not of a family snp_fast knows how to prune."""


class Step(ABC):
    """One stretch of the network the pipeline runs in order: a block (its groups are selected, sliced and
    re-fitted) or a piece between blocks (a downsample, a reshape) that may only be re-fitted or run."""
    name: str = ''               # module name, for messages
    original: nn.Module          # the module of the ORIGINAL model that this step runs
    pruned: nn.Module            # its counterpart in the pruned model
    params: List[str] = []       # the parameters this step slices into the pruned model
    buffers: List[str] = []      # and the buffers
    kwargs: dict = {}            # what the module's forward takes besides the hidden states

    def preselect(self, ctx: PruneContext):
        """Choices known before the calibration run (from weights alone); passed on to taps and select."""
        return None

    def taps(self, ctx: PruneContext, pre) -> Dict[str, tuple]:
        """What to capture from the original module's run (capture.run_captured's taps)."""
        return {}

    def after_capture(self, cap: dict) -> None:
        """Post-process the captures in place (e.g. form the q/k/v outputs from a captured input)."""

    def select(self, ctx: PruneContext, cap: dict, pre):
        """This block's selection (None for a step with no groups of its own)."""
        return None

    def plan(self, ctx: PruneContext, sel) -> Plan:
        """The slices of this step's tensors."""
        return {}

    def refit(self, ctx: PruneContext, x: torch.Tensor, xp: torch.Tensor, cap: dict, sel) -> torch.Tensor:
        """Re-fit the pruned module in place; return its output on `xp` (the pruned model's hidden states).
        x: the original model's hidden states entering the step."""
        return xp


class Family(ABC):
    """One model family: structure and widths, pipeline hooks and what reports print."""
    name: str = ''        # recorded in recipes ('vit', 'efficientformer', ...)
    supported: str = ''   # what it prunes, for error messages
    dims_type: type       # the widths dataclass (with to_dict / from_dict)
    selection_type: type  # the kept-indices dataclass (with to_dict / from_dict)

    # --- structure and widths ----------------------------------------------------------------------
    @abstractmethod
    def claims(self, model: nn.Module) -> bool:
        """Whether `model` is of this family's model type (check_supported then says what is not supported)."""

    @abstractmethod
    def check_supported(self, model: nn.Module) -> None:
        """UnsupportedModelError, naming what is supported, unless `model` can be pruned."""

    @abstractmethod
    def model_dims(self, model: nn.Module):
        """The model's widths (a dims_type)."""

    @abstractmethod
    def apply_dims(self, model: nn.Module, dims) -> nn.Module:
        """Turn a meta-device copy of the ORIGINAL model into the architecture of `dims`, in place."""

    @abstractmethod
    def resolve_ratios(self, spec, dims) -> dict:
        """Any accepted ratio form (float, dict, preset name) -> the family's normalised ratios."""

    @abstractmethod
    def target_dims(self, dims, ratios: dict, notes: List[str]):
        """The widths the normalised ratios leave (notes: what was clamped)."""

    @abstractmethod
    def preset_mismatch(self, name: str, dims) -> Optional[str]:
        """ValueError for a preset of another family; a warning text when the preset's MACs do not apply."""

    @abstractmethod
    def width_lines(self, before, after) -> List[str]:
        """The table of widths before -> after (the first line continues the report's totals line)."""

    @abstractmethod
    def slice_plan(self, model: nn.Module, selection) -> Plan:
        """Every slice a selection makes (the stem and head's and every block's)."""

    # --- rebuilding the unpruned architecture (save / load) ----------------------------------------
    def rebuild_info(self, model: nn.Module, timm_name: Optional[str], timm_kwargs: Optional[dict]) -> dict:
        """What a recipe records to rebuild the unpruned architecture (default: its timm name and kwargs)."""
        name, kwargs, why = resolve_timm_config(model, timm_name, timm_kwargs)
        return {'timm_name': name, 'timm_kwargs': kwargs, 'timm_unavailable': why}

    def data_config(self, model: nn.Module) -> Optional[dict]:
        """The model's evaluation preprocessing (timm's data config keys), recorded in the recipe so that the
        pruned model is evaluated as its original was; None where the family has none."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config(model).items()}

    def rebuild_problem(self, recipe: dict) -> str:
        """Why a recipe cannot be rebuilt ('' when it can)."""
        if recipe.get('timm_name'):
            return ''
        return (f'the unpruned architecture cannot be rebuilt with timm ({recipe.get("timm_unavailable")}); '
                'pass timm_name= and timm_kwargs= to snp_fast.prune()')

    def build_unpruned(self, recipe: dict) -> nn.Module:
        """The unpruned architecture a recipe describes, on the meta device (no weights, never the network);
        ValueError saying why not."""
        return build_timm_skeleton(recipe)

    def selection_dims(self, selection, dims_before):
        """The widths a given selection keeps."""
        return selection.dims()

    # --- pipeline hooks ----------------------------------------------------------------------------
    def check_settings(self, settings) -> None:
        """ValueError for a setting this family does not support (settings: a PruneSettings)."""

    def check_calib(self, model: nn.Module, calib: torch.Tensor) -> None:
        """ValueError when the images do not fit the model."""

    def check_request(self, ctx: PruneContext) -> None:
        """ValueError for what this family cannot do with these settings and widths."""

    def choose_drops(self, ctx: PruneContext, ratios: dict) -> dict:
        """Resolve data-dependent parts of the ratios (e.g. a number of branches to drop)."""
        return ratios

    @abstractmethod
    def select_stream(self, ctx: PruneContext):
        """The residual-stream selection (shared by every block), chosen before the loop."""

    @abstractmethod
    def outer_plan(self, model: nn.Module, stream) -> Plan:
        """Slices of every tensor outside the blocks."""

    @abstractmethod
    def outer_names(self, model: nn.Module) -> Tuple[List[str], List[str]]:
        """(parameters, buffers) sliced or copied before the loop."""

    @abstractmethod
    def prefix(self, model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
        """The hidden states entering the first step."""

    @abstractmethod
    def steps(self, ctx: PruneContext, pruned: nn.Module, stream) -> Iterable[Step]:
        """The steps of the loop, in order."""

    @abstractmethod
    def refit_head(self, ctx: PruneContext, pruned: nn.Module, x: torch.Tensor, xp: torch.Tensor, stream) -> None:
        """Re-fit what follows the last step (classifier heads) to the original's outputs."""

    @abstractmethod
    def make_selection(self, stream, blocks: list):
        """The selection_type from the stream selection and the blocks' selections."""
