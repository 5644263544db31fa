"""Selection criteria beyond the paper's (snp_fast/scores.py), as Selectors for prune(selection=...) and the
prune(criteria=...) switch: Reconstruction (the consumer's least-squares error after the re-fit)."""
from .reconstruction import Reconstruction, consumer_gram, greedy_removal, obs_error, removal_scores

__all__ = ['Reconstruction', 'consumer_gram', 'greedy_removal', 'obs_error', 'removal_scores', 'CRITERIA']

CRITERIA = ('snp', 'reconstruction', 'magnitude')  # prune(criteria=...), the default first
