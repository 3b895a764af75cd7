"""Example conversations, labels and questions, shipped as package data for `flexor up --demo`."""
