"""What every subcommand shares: exit codes, UsageError, logging, --model-kwargs, --device, model building
and weights with errors mapped to the command line's flags, and the one place that asks for a model's family."""
import json
import sys
from typing import Optional

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input (exit status 2); the message names the argument or file at fault."""


def log(msg: str = '') -> None:
    """A line on stderr (progress, notes, warnings; stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# model families: the ONE place the command line asks which family a model or a recipe belongs to

def family(model_or_recipe):
    """The snp_fast.families.Family of a timm model (UnsupportedModelError for none), or of a recipe (dict)
    written by save_pruned (RecipeError for an unknown family).

    Every family-dependent step of the command line asks here; the answer comes from the family registry.
    """
    from ..families import family_for_recipe, family_of
    if isinstance(model_or_recipe, dict):
        from ..io import RecipeError
        try:
            return family_for_recipe(model_or_recipe)
        except ValueError as e:
            raise RecipeError(f'recipe.json: {e}') from None
    return family_of(model_or_recipe)


def check_supported(model) -> None:
    """The model family's own structure check (UnsupportedModelError for what snp_fast cannot prune)."""
    family(model).check_supported(model)


# ------------------------------------------------------------------------------------------------
# arguments shared by several subcommands

def model_kwargs(text: Optional[str]) -> dict:
    """The --model-kwargs JSON object ({} when not given)."""
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f'--model-kwargs is not valid JSON: {e}') from None
    if not isinstance(kw, dict):
        raise UsageError(f'--model-kwargs must be a JSON object, got {type(kw).__name__}')
    return kw


def resolve_device(name: str):
    """The torch.device of --device ('auto': cuda when available, else cpu)."""
    import torch
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f'--device {name!r}: {e}') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    if dev.type not in ('cpu', 'cuda'):
        raise UsageError(f'--device {name}: not a device to run on here; use cpu or cuda'
                         + (' (meta tensors hold no data)' if dev.type == 'meta' else ''))
    return dev


def create_model(name: str, kwargs: dict, pretrained: bool = False, device='meta',
                 kwargs_flag: str = '--model-kwargs'):
    """snp_fast.weights.create_model with its errors naming MODEL / --model-kwargs / --pretrained, then the
    family's structure check and a meta forward pass at the model's input size (weights.check_forward)."""
    from ..weights import WeightsError, check_forward, create_model as create
    try:
        model = create(name, kwargs, pretrained=pretrained, device=device)
        check_supported(model)
        check_forward(model)
    except WeightsError as e:
        if e.arg == 'kwargs':
            raise UsageError(f'timm cannot build {name!r} with {kwargs_flag} {kwargs}: {e.detail}') from None
        if e.arg == 'size':
            raise UsageError((f'{kwargs_flag} {kwargs}: ' if kwargs else f'MODEL {name}: ') + str(e)) from None
        if e.arg == 'pretrained':
            raise UsageError(f'--pretrained: {e} (--checkpoint PATH)') from None
        raise UsageError(f'MODEL {e}') from None
    return model


def load_checkpoint(model, path: str, flag: str = '--checkpoint') -> None:
    """snp_fast.weights.load_checkpoint with its errors naming `flag`."""
    from ..weights import WeightsError, load_checkpoint as load
    try:
        load(model, path)
    except WeightsError as e:
        raise UsageError(f'{flag} {e}') from None
