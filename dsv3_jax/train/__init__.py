"""Training: recipe, schedules, optimizer, losses, load balancing, checkpoints, the step and the loop."""
