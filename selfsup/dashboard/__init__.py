"""The Streamlit dashboard (`selfsup dashboard`): runs, sweeps, DINO attention maps, embeddings,
MAE/SimMIM reconstructions and augmentation views, read from the runs' storage."""
