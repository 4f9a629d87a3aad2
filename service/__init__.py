"""FusionRank online ranking service."""
