"""CLIP score on a tiny CLIP built from config and saved as a transformers folder (config, weights, tokenizer,
preprocessor config), loaded the way a local copy of real CLIP weights is.

Facts from transformers (5.x) the independent computation relies on: CLIPModel's image embedding is
`visual_projection(vision_model(pixel_values).pooler_output)`, its text embedding
`text_projection(text_model(input_ids).pooler_output)`; CLIPImageProcessor rescales uint8 by 1/255 and
normalises with image_mean / image_std (resize and crop are no-ops on images already at the crop size).
"""
import pytest
import torch

from sfd.metrics.clip_score import CLIPScorer, clip_score
from sfd.hf import tiny_clip_tokenizer

transformers = pytest.importorskip("transformers")  # a declared dependency: skipped only in a broken environment

PROMPTS = ["a red bicycle", "two dogs on a beach", "a bowl of oranges", "a snowy mountain"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _images(n, size=32, seed=0):
    u8 = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return u8, u8.float() / 127.5 - 1.0


def test_clip_score_equals_the_independent_computation(folder):
    scorer = CLIPScorer.from_folder(folder)
    u8, images = _images(4)
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in u8], return_tensors="pt").pixel_values
    ids = transformers.CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=77,
                                                           return_tensors="pt").input_ids
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    expected = 100 * (img * txt).sum(-1)
    torch.testing.assert_close(scorer.scores(images, PROMPTS), expected, rtol=1e-4, atol=1e-4)
    assert clip_score(scorer, images, PROMPTS, batch_size=3) == pytest.approx(float(expected.mean()), abs=1e-4)


def test_clip_score_depends_on_the_pairing_and_resizes_any_image(folder):
    scorer = CLIPScorer.from_folder(folder)
    _, images = _images(4, size=48, seed=1)
    matched = scorer.scores(images, PROMPTS)
    assert matched.shape == (4,) and bool((matched.abs() <= 100).all())
    assert not torch.allclose(matched, scorer.scores(images, PROMPTS[::-1]))
    assert scorer.preprocess(torch.zeros(2, 3, 64, 48)).shape == (2, 3, 32, 32)  # short side to 32, centre crop
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.scores(images, PROMPTS[:2])


def test_missing_clip_folder_names_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*huggingface-cli download laion/CLIP-ViT-g-14"):
        CLIPScorer.from_folder(tmp_path)
