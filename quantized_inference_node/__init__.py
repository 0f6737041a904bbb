"""Serving quantized ONNX perception models with ONNX Runtime, and the offline HAWQ tool."""
