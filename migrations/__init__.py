"""Numbered SQL migrations, shipped as package data so installed wheels find them."""
