"""The online CTR scoring service: FastAPI over a model repository, a behaviour store and a batcher."""
