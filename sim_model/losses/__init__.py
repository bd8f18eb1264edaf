"""Box-supervised mask losses as free functions on tensors: BoxInst's projection and pairwise losses, and the Dice
loss they share with SIM."""
