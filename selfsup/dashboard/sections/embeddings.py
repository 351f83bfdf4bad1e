"""Embeddings: a checkpoint's features of test images in 2-D (PCA by default, UMAP on request),
coloured by class, and nearest-neighbour retrieval among training images; or the same of a
`selfsup embed` Parquet output kept under the root (its keys stand in for the pictures)."""

import altair as alt
import pandas as pd
import streamlit as st
import torch

from selfsup.dashboard import data, pictures, plain
from selfsup.dashboard.widgets import pick_model

st.title("Embeddings")
root = data.root()
source = st.radio("features", ["of a checkpoint", "from a `selfsup embed` output"], horizontal=True)
if source != "of a checkpoint":
    folder = st.text_input(f"its folder under {root}", placeholder="my-run/embeddings",
                           help=f"what `selfsup embed RUN DATA {root}/my-run/embeddings` wrote")
    if not folder:
        st.stop()
c1, c2, c3 = st.columns(3)
n_test = c1.select_slider("test images", [500, 1000, 2000, 5000, 10000], 2000)
n_train = c2.select_slider("training images to search", [1000, 5000, 10000, 60000], 5000)
reducer = c3.radio("2-D map", ["PCA", "UMAP"], horizontal=True, help="UMAP is slower (umap-learn)")


@st.cache_resource(max_entries=8, show_spinner="computing features ...")
def features(root: str, name: str, ckpt: str, which: str, n: int):
    from selfsup.platform.evaluate import extract_features

    cfg, method, _ = data.model(root, name, ckpt)
    images, labels, classes = data.labeled(cfg, which, n)
    f = extract_features(method.backbone, images, cfg.eval.image_size or cfg.view_size(), cfg.data.mean,
                         cfg.data.std, cfg.model.in_chans)
    return f, labels, classes, images


def project_and_plot(f: torch.Tensor, y: torch.Tensor, classes: list[str], key: tuple, caption: str, unlabeled: str):
    """The 2-D map of `f`, coloured by class when there are labels (else `unlabeled` says why not);
    the labels as names."""
    has_labels = bool((y >= 0).any())
    xy = project(f, key, reducer)
    label = [data.class_name(classes, int(c)) for c in y]
    df = pd.DataFrame({"x": xy[:, 0].numpy(), "y": xy[:, 1].numpy(), "class": label, "index": range(len(label))})
    st.caption(caption + ("" if has_labels else f" · {unlabeled}"))
    chart = alt.Chart(df, title=f"{reducer} of the features").mark_circle(size=14, opacity=0.7)
    encoding = dict(x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None), tooltip=["index", "class"])
    st.altair_chart(chart.encode(**encoding, **({"color": alt.Color("class:N")} if has_labels else {})), width="stretch")
    return label, has_labels


@st.cache_data(max_entries=8, show_spinner="projecting to 2-D ...")
def project(_f: torch.Tensor, key: tuple, how: str):
    if how == "UMAP":
        import umap

        n = min(15, len(_f) - 1)  # UMAP's default neighbourhood, for a handful of images too
        return torch.from_numpy(umap.UMAP(n_components=2, n_neighbors=max(2, n), random_state=0).fit_transform(_f.numpy()))
    centred = _f - _f.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=2, center=False)
    return centred @ v[:, :2]


if source != "of a checkpoint":
    try:
        test_keys, test_y, test_f = data.embeddings(root, folder, "test", n_test)
        train_keys, train_y, train_f = data.embeddings(root, folder, "train", n_train, seed=1)
    except Exception as e:  # a page shows why, in one line, and stays up
        st.error(plain(f"{folder}: {e}"))
        st.stop()
    label, has_labels = project_and_plot(test_f, test_y, [], (folder, n_test),
                                         f"{folder} · {len(test_f)} queries · {test_f.shape[1]}-d features",
                                         "the embedded set has no labels")
    st.subheader("nearest neighbours")
    k = st.slider("k", 1, 20, 8)
    i = st.number_input(f"query (0-{len(test_f) - 1})", 0, len(test_f) - 1, 0)
    sim, idx = (test_f[i:i + 1] @ train_f.T).topk(min(k, len(train_f)))
    st.write(f"query: `{plain(str(test_keys[i]))}` ({label[i]})")
    st.dataframe(pd.DataFrame({"key": [str(train_keys[j]) for j in idx[0].tolist()],
                               "class": [data.class_name([], int(train_y[j])) for j in idx[0].tolist()],
                               "similarity": sim[0].numpy().round(3)}), hide_index=True)
    st.stop()

name, cfg, method, used = pick_model(root)
test_f, test_y, classes, test_imgs = features(root, name, used, "test", n_test)
label, has_labels = project_and_plot(test_f, test_y, classes, (name, used, n_test),
                                     f"{name} · {used} · {len(test_f)} test images · {test_f.shape[1]}-d features",
                                     "the data set has no labels (eval.data_uri gives a labeled one)")

st.subheader("nearest training images")
k = st.slider("k", 1, 20, 8)
i = st.number_input(f"query: test image (0-{len(test_imgs) - 1})", 0, len(test_imgs) - 1, 0)
train_f, train_y, _, train_imgs = features(root, name, used, "train", n_train)
sim, idx = (test_f[i:i + 1] @ train_f.T).topk(min(k, len(train_f)))
SHOW = 96


def picture(img):
    x = img.float()[None] / 255
    return pictures.as_image(torch.nn.functional.interpolate(x, size=(SHOW, SHOW), mode="nearest")[0])


hits = [int(j) for j in idx[0]]
st.image([picture(test_imgs[i])] + [picture(train_imgs[j]) for j in hits],
         caption=[f"query: {label[i]}"] + [f"{data.class_name(classes, int(train_y[j]))} ({float(s):.2f})"
                                           for j, s in zip(hits, sim[0])])
if has_labels and int(test_y[i]) >= 0:
    agree = sum(int(train_y[j]) == int(test_y[i]) for j in hits)
    st.caption(f"{agree} of {len(hits)} neighbours share the query's class")
