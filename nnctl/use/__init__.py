"""Using a trained model: predict, evaluate, export."""
