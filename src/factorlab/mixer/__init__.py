"""The LoRA-Mixer lab: multi-task data (synthetic tasks, reasoning-gym), the experiment config and
model factory, training (the loop wrapper, the joint and plug-and-play workflows), evaluation (greedy
generation, accuracy, routing reports) and plots. ``factorlab.recipes.mixer`` runs them."""
