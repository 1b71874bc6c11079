"""The paper recipes, installed as the package ``erc_verl.recipe`` so ``erc-verl demo`` runs them from any install."""
