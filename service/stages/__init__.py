"""The stages of the request path, one small typed unit per module (shapes in each docstring):

query_encoder   query text -> query embedding [384] + retrieval vector (LRU cached)
retrieval       retrieval vector -> top-k candidate ids (FAISS)
feature_fetch   candidate ids -> item features [n, F] float16 (one feature store round trip)
scoring         packed batch -> score, text and image contributions (onnxruntime)
batcher         concurrent requests' candidates -> one scoring run -> split back
onnx_session    shared: opening onnxruntime sessions on CPU or CUDA
"""
