"""serve/a1111.py, a1111_images.py, a1111_results.py: A1111's JSON -> ImageRequest (every key, every refusal a
422 naming the key), images in (base64, bounded) and out (PNG with both text chunks, no server paths), the
response JSON and the lists. Pure: a stand-in catalog, no model, no HTTP."""
from __future__ import annotations

import base64
import io
import json
import math
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from latentdiff.diffusion.samplers.names import A1111_GRID, resolve_sampler, resolve_schedule
from latentdiff.serve import a1111_results
from latentdiff.serve.a1111 import ModelFacts, Options, img2img_request, txt2img_request
from latentdiff.serve.a1111_images import decode_image, encode_png, png_info, public_params, save_outputs
from latentdiff.serve.requests import GeneratedImage, Hires, JobResult, RequestError
from latentdiff.serve.settings import ServeSettings
from latentdiff.utils.infotext import parse_infotext

SETTINGS = ServeSettings(max_steps=150, max_side=2048, max_images=16, max_image_bytes=200_000)


class Catalog:
    """The ModelCatalog surface a1111.py uses."""

    current = "shapes-64"

    def resolve(self, name, *, field):
        if name in ("shapes-64", "shapes-64 [0123456789]", "other"):
            return "other" if name == "other" else "shapes-64"
        raise RequestError("unknown checkpoint", field=field, found=name)

    def resolve_vae(self, name, *, field):
        if name in (None, "Automatic", "None"):
            return None
        if name == "good.safetensors":
            return "good"
        raise RequestError("unknown vae", field=field, found=name)

    def loras(self):
        return [{"name": "detail", "alias": "detail", "path": "detail.safetensors", "metadata": {}}]


class Defaults:
    def __init__(self, clip_layers=12):
        self.calls, self.clip_layers = [], clip_layers

    def __call__(self, model, vae):
        self.calls.append((model, vae))
        return ModelFacts(height=48, width=64, sampler="ddim", clip_layers=self.clip_layers)


def txt(body, **kw):
    defaults = kw.pop("defaults", Defaults())
    return txt2img_request(body, options=kw.pop("options", Options(model="shapes-64")), catalog=Catalog(),
                           settings=kw.pop("settings", SETTINGS), defaults=defaults, rng=random.Random(0), **kw)


def img(body, **kw):
    return img2img_request(body, options=Options(model="shapes-64"), catalog=Catalog(), settings=SETTINGS,
                           defaults=Defaults(), rng=random.Random(0), **kw)


def b64png(image, prefix=False):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return "data:image/png;base64," + text if prefix else text


def refused(call, body, field, status=422):
    with pytest.raises(RequestError) as info:
        call(body)
    assert (info.value.field, info.value.status) == (field, status), str(info.value)
    return info.value


# ---- txt2img ------------------------------------------------------------------------------------------------------
def test_an_empty_body_takes_the_documented_defaults():
    defaults = Defaults()
    r = txt({}, defaults=defaults)
    assert (r.model, r.width, r.height, r.steps, r.guidance, r.sampler, r.schedule, r.eta) == (
        "shapes-64", 64, 48, 50, 7.0, None, None, None)
    assert (r.batch_size, r.n_iter, r.prompt, r.negative_prompt, r.clip_skip, r.vae) == (1, 1, "", "", None, None)
    assert 0 <= r.seed < 2**32 and 0 <= r.subseed < 2**32 and r.seed == random.Random(0).randrange(2**32)
    assert r.hires is None and r.init is None and r.ignored == () and r.send_images and not r.save_images
    assert defaults.calls == [("shapes-64", None)]     # asked once, for the size


def test_a_webuiapi_payload_maps_every_key_and_lists_the_rest_as_ignored():
    body = {"prompt": "a red circle <lora:detail:0.8>", "negative_prompt": "blue", "width": 64, "height": 32,
            "steps": 7, "cfg_scale": 5.5, "seed": 123, "subseed": 9, "subseed_strength": 0.0,
            "sampler_name": "DPM++ 2M Karras", "sampler_index": "Euler a", "scheduler": "automatic",
            "batch_size": 2, "n_iter": 3, "eta": 1.0, "styles": [], "restore_faces": False, "tiling": False,
            "alwayson_scripts": {}, "script_name": None, "script_args": [], "do_not_save_grid": False,
            "s_churn": 0, "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "good.safetensors",
                                                "sd_model_checkpoint": "other", "samples_format": "png"},
            "override_settings_restore_afterwards": True, "send_images": True, "save_images": False,
            "enable_hr": False, "hr_scale": 2, "denoising_strength": 0.7, "my_extension_key": 1}
    defaults = Defaults()
    r = txt(body, defaults=defaults)
    assert (r.prompt, r.negative_prompt, r.width, r.height, r.steps, r.guidance, r.seed, r.subseed) == (
        body["prompt"], "blue", 64, 32, 7, 5.5, 123, 9)
    assert (r.sampler, r.schedule, r.eta, r.batch_size, r.n_iter) == ("dpmpp_2m", "karras", None, 2, 3)
    assert (r.model, r.vae, r.clip_skip) == ("other", "good", 2)
    assert r.seeds() == list(range(123, 129)) and r.hires is None
    assert defaults.calls == [("other", "good")]     # only to check the clip skip against its text encoder
    assert set(r.ignored) == {"alwayson_scripts", "do_not_save_grid", "eta", "my_extension_key", "restore_faces",
                              "s_churn", "script_args", "script_name", "styles", "tiling", "denoising_strength",
                              "override_settings.samples_format"}


@pytest.mark.parametrize("name, scheduler, expected", [
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")), ("DPM++ 2M", None, ("dpmpp_2m", "karras")),
    ("DPM++ 2M", "Exponential", ("dpmpp_2m", "exponential")), ("Euler a", None, ("euler_ancestral", None)),
    ("Euler a", "Automatic", ("euler_ancestral", None)), ("DDIM", None, ("ddim", None)),
    ("LMS", None, ("lms", "default")), ("LMS", "Karras", ("lms", "karras")), ("Heun", "Uniform", ("heun", "default")),
    ("k_lms", None, ("lms", "default")), ("Euler", "karras", ("euler", "karras")),
])
def test_a1111_sampler_labels_resolve(name, scheduler, expected):
    r = txt({"sampler_name": name, "scheduler": scheduler, "width": 64, "height": 64})
    assert (r.sampler, r.schedule) == expected


@pytest.mark.parametrize("name, expected", [
    ("DPM++ 2M SDE Heun", ("dpmpp_2m_sde", "exponential", {"noise_type": "brownian", "solver_type": "heun"})),
    ("DPM2 a", ("dpm_2_ancestral", "karras", {"discard_next_to_last_sigma": True})),
    ("dpmpp_2m_sde", ("dpmpp_2m_sde", None, None)), ("DPM++ 2M", ("dpmpp_2m", "karras", {})),
    ("DDIM", ("ddim", None, None)),
])
def test_a1111_labels_carry_the_settings_they_fix(name, expected):
    """A label A1111 runs through k-diffusion: A1111's grid and its options; other names: none."""
    r = txt({"sampler_name": name, "width": 64, "height": 64})
    sampler, schedule, options = expected
    fixed = () if options is None else tuple(sorted((A1111_GRID | options).items()))
    assert (r.sampler, r.schedule, r.sampler_options) == (sampler, schedule, fixed)


def test_requests_differing_only_in_the_labels_options_do_not_share_a_call():
    heun = txt({"sampler_name": "DPM++ 2M SDE Heun", "width": 64, "height": 64})
    plain = txt({"sampler_name": "dpmpp_2m_sde", "scheduler": "exponential", "width": 64, "height": 64})
    assert (heun.sampler, heun.schedule) == (plain.sampler, plain.schedule)
    assert heun.batch_key() != plain.batch_key()


def test_sampler_name_wins_over_sampler_index_and_either_alone_works():
    assert txt({"sampler_index": "Heun", "width": 64, "height": 64}).sampler == "heun"
    assert txt({"sampler_name": "LMS", "sampler_index": "Heun", "width": 64, "height": 64}).sampler == "lms"
    assert txt({"sampler_name": "", "sampler_index": "Heun", "width": 64, "height": 64}).sampler == "heun"


def test_a_scheduler_alone_applies_to_the_models_own_sampler_and_eta_follows_it():
    assert refused(txt, {"scheduler": "Karras"}, "scheduler").expected is not None   # ddim has no schedule
    r = txt({"eta": 0.5})                      # the model's own ddim has an eta
    assert (r.sampler, r.eta, r.ignored) == (None, 0.5, ())
    assert txt({"sampler_name": "Euler a", "eta": 0.5}).ignored == ("eta",)


def test_an_unknown_sampler_is_a_422_listing_the_accepted_names():
    error = refused(txt, {"sampler_name": "Euler b"}, "sampler_name")
    assert "dpmpp_2m" in str(error.expected) and "Euler b" in str(error.found)
    assert "closest" in str(refused(txt, {"sampler_name": "DPM adaptive"}, "sampler_name").expected)
    refused(txt, {"sampler_name": "Euler", "scheduler": "KL Optimal"}, "scheduler")     # not implemented yet


@pytest.mark.parametrize("body, field", [
    ([1, 2], "body"), ({"width": "64"}, "width"), ({"width": 65}, "width"), ({"width": 0}, "width"),
    ({"width": 4096}, "width"), ({"height": 64.5}, "height"), ({"steps": 0}, "steps"), ({"steps": 151}, "steps"),
    ({"steps": True}, "steps"), ({"cfg_scale": math.nan}, "cfg_scale"), ({"cfg_scale": math.inf}, "cfg_scale"),
    ({"cfg_scale": "7"}, "cfg_scale"), ({"cfg_scale": -1}, "cfg_scale"), ({"cfg_scale": 10**400}, "cfg_scale"),
    ({"steps": 10**400}, "steps"), ({"subseed_strength": -math.inf}, "subseed_strength"),
    ({"seed": math.nan}, "seed"), ({"seed": -2}, "seed"),
    ({"seed": 2**63}, "seed"), ({"seed": "1"}, "seed"), ({"subseed": 1.5}, "subseed"),
    ({"subseed_strength": 1.5}, "subseed_strength"), ({"batch_size": 0}, "batch_size"), ({"n_iter": 17}, "n_iter"),
    ({"batch_size": 4, "n_iter": 5}, "n_iter"), ({"prompt": 5}, "prompt"), ({"prompt": "a\x00b"}, "prompt"),
    ({"negative_prompt": ["x"]}, "negative_prompt"), ({"send_images": "yes"}, "send_images"),
    ({"save_images": 2}, "save_images"), ({"eta": -0.1}, "eta"), ({"sampler_name": 3}, "sampler_name"),
    ({"override_settings": [1]}, "override_settings."), ({"override_settings": {"CLIP_stop_at_last_layers": 0}},
                                                          "override_settings.CLIP_stop_at_last_layers"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings": {"sd_vae": "../x.pt"}}, "override_settings.sd_vae"),
    ({"override_settings": {"sd_model_checkpoint": 5}}, "override_settings.sd_model_checkpoint"),
    ({"override_settings_restore_afterwards": "no"}, "override_settings_restore_afterwards"),
    ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale"), ({"enable_hr": True, "hr_scale": 9}, "hr_scale"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ({"enable_hr": True, "denoising_strength": 2}, "denoising_strength"),
    ({"enable_hr": True, "hr_second_pass_steps": -1}, "hr_second_pass_steps"),
    ({"enable_hr": True, "hr_resize_x": 32}, "hr_resize_x"), ({"enable_hr": "1"}, "enable_hr"),
    ({"prompt": "x <lora:missing:0.5>"}, "prompt"), ({"prompt": "x <lora:../../etc/passwd:0.8>"}, "prompt"),
    ({"negative_prompt": "<lora:/etc/passwd>"}, "negative_prompt"),
])
def test_every_bad_value_is_a_422_naming_its_key(body, field):
    refused(lambda b: txt(b, defaults=lambda m, v: ModelFacts(64, 64, "ddim", 12)), body, field)


def test_hires_keys_make_a_hires_request():
    r = txt({"enable_hr": True, "width": 64, "height": 32, "hr_upscaler": "Latent (nearest)", "hr_scale": 1.5,
             "hr_second_pass_steps": 3, "denoising_strength": 0.5})
    assert r.hires == Hires(scale=1.5, upscaler="latent-nearest", steps=3, strength=0.5) and r.batch_key() is None
    assert txt({"enable_hr": True, "width": 64, "height": 64}).hires == Hires(2.0, "latent", None, 0.7)
    assert txt({"enable_hr": True, "width": 64, "height": 64, "hr_upscaler": "None"}).hires.upscaler == "image"
    resized = txt({"enable_hr": True, "width": 64, "height": 32, "hr_resize_x": 96, "hr_resize_y": 48}).hires
    assert (int(64 * resized.scale), int(32 * resized.scale)) == (96, 48)
    only_y = txt({"enable_hr": True, "width": 48, "height": 56, "hr_resize_y": 200}).hires
    assert int(56 * only_y.scale) == 200
    refused(txt, {"enable_hr": True, "width": 64, "height": 32, "hr_resize_x": 128, "hr_resize_y": 128},
            "hr_resize_y")


def test_random_seeds_are_drawn_in_a1111s_range_and_given_ones_kept():
    seeds = {txt2img_request({"seed": -1, "width": 64, "height": 64}, options=Options(model="m"), catalog=Catalog(),
                             settings=SETTINGS, defaults=Defaults()).seed for _ in range(20)}
    assert len(seeds) > 15 and all(0 <= s < 2**32 for s in seeds)
    assert txt({"seed": 2**40, "width": 64, "height": 64}).seed == 2**40


def test_options_and_overrides_combine_and_save_images_needs_an_outputs_dir(tmp_path):
    options = Options(model="other", vae="good", clip_skip=2)
    r = txt({"width": 64, "height": 64}, options=options)
    assert (r.model, r.vae, r.clip_skip) == ("other", "good", 2)
    r = txt({"width": 64, "height": 64, "override_settings": {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1}},
            options=options)
    assert (r.model, r.vae, r.clip_skip) == ("other", None, None)
    r = txt({"width": 64, "height": 64, "save_images": True, "override_settings_restore_afterwards": False})
    assert not r.save_images and r.ignored == ("override_settings_restore_afterwards", "save_images")
    saved = txt({"width": 64, "height": 64, "save_images": True},
                settings=ServeSettings(outputs_dir=tmp_path))
    assert saved.save_images and saved.ignored == ()


# ---- img2img and images in ----------------------------------------------------------------------------------------
def gradient(width, height, mode="RGB"):
    rng = np.random.default_rng(width * height)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def test_img2img_decodes_images_with_or_without_a_data_url_and_takes_their_size():
    a, b = gradient(50, 42), gradient(64, 64)
    r = img({"init_images": [b64png(a, prefix=True), b64png(b)], "denoising_strength": 0.4, "resize_mode": 1})
    for decoded, sent in zip(r.init.images, (a, b), strict=True):
        assert np.array_equal(np.asarray(decoded), np.asarray(sent))
    assert (r.width, r.height, r.init.strength, r.init.resize_mode, r.init.mask) == (48, 40, 0.4, 1, None)
    assert img({"init_images": [b64png(a)], "width": 64}).width == 64
    assert img({"init_images": [b64png(a)]}).init.strength == 0.75


def test_the_mask_is_inverted_and_blurred_as_asked():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    body = {"init_images": [b64png(gradient(32, 32))], "mask": b64png(mask, prefix=True), "mask_blur": 0}
    assert np.array_equal(np.asarray(img(body).init.mask), np.asarray(mask))
    inverted = np.asarray(img({**body, "inpainting_mask_invert": 1}).init.mask)
    assert np.array_equal(inverted, 255 - np.asarray(mask))
    blurred = np.asarray(img({**body, "mask_blur": 4}).init.mask)
    assert 0 < blurred[16, 16] < 255 and blurred[16, 0] == 255 and blurred[16, 31] == 0
    r = img({**body, "inpainting_fill": 1, "inpaint_full_res": True})
    assert (r.init.inpainting_fill, r.init.inpaint_full_res) == (1, True)


def bomb_png(width, height):
    """A valid PNG header claiming width x height pixels (the data is a few bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("value, status", [
    ("not base64!!", 422), (base64.b64encode(b"just some bytes").decode(), 422), ("", 422), (5, 422),
    (base64.b64encode(bomb_png(30000, 30000)).decode(), 422), ("data:image/png;base64,@@@", 422),
    (base64.b64encode(b"\0" * 300_000).decode(), 413),
])
def test_a_bad_init_image_is_refused_naming_it(value, status):
    good = b64png(gradient(16, 16))
    refused(img, {"init_images": [good, value]}, "init_images[1]", status)


@pytest.mark.parametrize("body, field", [
    ({"init_images": None}, "init_images"), ({"init_images": []}, "init_images"),
    ({"init_images": "abc"}, "init_images"),
    ({"mask": "@@"}, "mask"), ({"resize_mode": 3}, "resize_mode"), ({"inpainting_fill": 4}, "inpainting_fill"),
    ({"mask_blur": -1, "mask": "m"}, "mask_blur"), ({"denoising_strength": -0.5}, "denoising_strength"),
])
def test_bad_img2img_keys_are_422s(body, field):
    image = b64png(gradient(16, 16))
    body = {"init_images": [image], **body}
    if body.get("mask") == "m":
        body["mask"] = b64png(gradient(16, 16, "L"))
    refused(img, body, field)


def test_include_init_images_is_listed_as_ignored():
    assert img({"init_images": [b64png(gradient(16, 16))], "include_init_images": True}).ignored == (
        "include_init_images",)


# ---- images out, the response -------------------------------------------------------------------------------------
PARAMS = {"prompt": "a red circle", "negative": "blue", "steps": 7, "guidance": 5.5, "sampler": "dpmpp_2m",
          "schedule": "karras", "seed": 123, "width": 32, "height": 48, "model": "/srv/secret/models/shapes-64",
          "lora": [{"path": "/srv/secret/loras/detail.safetensors", "weight": 0.8, "sha256": "ab" * 32}]}


def result(n=2, **request):
    r = txt({"prompt": "a red circle <lora:detail:0.8>", "width": 32, "height": 48, "seed": 123, "batch_size": n,
             "styles": ["x"], **request})
    images = [GeneratedImage(gradient(32, 48), s, 0, {**PARAMS, "seed": s}) for s in r.seeds()]
    return JobResult(request=r, images=images)


def test_the_response_carries_pngs_with_both_chunks_and_no_server_path():
    job = result()
    body = {"prompt": "a red circle <lora:detail:0.8>", "seed": 123, "batch_size": 2, "styles": ["x"]}
    out = a1111_results.response_json(job, body, kind="txt2img", checkpoint={"model_name": "shapes-64",
                                                                             "hash": "0123456789"})
    assert len(out["images"]) == 2 and isinstance(out["info"], str)
    for encoded, generated in zip(out["images"], job.images, strict=True):
        data = base64.b64decode(encoded)
        assert b"/srv/secret" not in data
        with Image.open(io.BytesIO(data)) as png:
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(generated.image))
            text, stored = png.text["parameters"], json.loads(png.text["latentdiff"])
        parsed = parse_infotext(text, where="test")
        assert parsed.prompt == "a red circle <lora:detail:0.8>" and parsed.negative == "blue"
        assert (parsed.fields["Steps"], parsed.fields["Sampler"], parsed.fields["Schedule type"]) == (
            "7", "DPM++ 2M", "Karras")
        assert (parsed.fields["Seed"], parsed.fields["Size"], parsed.fields["Model"]) == (
            str(generated.seed), "32x48", "shapes-64")
        assert stored["lora"][0]["path"] == "detail.safetensors" and stored["model"] == "shapes-64"
    info = json.loads(out["info"])
    assert (info["seed"], info["all_seeds"], info["all_prompts"], info["sd_model_hash"]) == (
        123, [123, 124], [body["prompt"]] * 2, "0123456789")
    assert (info["sampler_name"], info["cfg_scale"], info["steps"], info["width"], info["height"]) == (
        "DPM++ 2M", 7.0, 50, 32, 48)
    assert info["infotexts"][1].startswith("a red circle <lora:detail:0.8>\nNegative prompt: blue\n")
    assert info["styles"] == ["x"] and info["ignored"] == ["styles"] and info["version"].startswith("latentdiff")
    assert {"all_subseeds", "subseed_strength", "job_timestamp", "sd_model_name", "sd_vae_name", "clip_skip",
            "extra_generation_params", "index_of_first_image", "is_using_inpainting_conditioning",
            "seed_resize_from_w", "all_negative_prompts", "batch_size", "n_iter"} <= set(info)
    assert out["parameters"]["seed"] == 123 and out["parameters"]["steps"] == 50      # A1111's echo: defaults + sent
    assert out["parameters"]["sampler_index"] == "Euler" and out["parameters"]["alwayson_scripts"] == {}


def test_send_images_false_sends_none_and_img2img_echo_drops_the_inputs():
    out = a1111_results.response_json(result(send_images=False), {}, kind="txt2img", checkpoint={})
    assert out["images"] == [] and len(json.loads(out["info"])["infotexts"]) == 2
    echo = a1111_results.echo_parameters({"init_images": ["abc"], "mask": "m"}, kind="img2img")
    assert (echo["init_images"], echo["mask"], echo["denoising_strength"]) == (None, None, 0.75)
    assert "enable_hr" not in echo


def test_public_params_cut_paths_to_file_names_and_keep_names():
    cleaned = public_params({**PARAMS, "model": "latentdiff/shapes-64", "vae": "C:\\vae\\x.pt",
                             "init_image": "~/in.png", "embedding": [{"path": "/e/tok.pt", "token": "tok"}]})
    assert (cleaned["model"], cleaned["vae"], cleaned["init_image"]) == ("latentdiff/shapes-64", "x.pt", "in.png")
    assert cleaned["embedding"] == [{"path": "tok.pt", "token": "tok"}] and "/srv" not in json.dumps(
        public_params(PARAMS))


def test_save_outputs_numbers_files_and_never_overwrites(tmp_path):
    (tmp_path / "00003-1.png").write_bytes(b"x")
    paths = save_outputs([(gradient(8, 8), PARAMS, 5), (gradient(8, 8), PARAMS, 6)], tmp_path)
    assert [p.name for p in paths] == ["00004-5.png", "00005-6.png"]
    assert (tmp_path / "00003-1.png").read_bytes() == b"x"
    with Image.open(paths[0]) as png:
        assert "/srv/secret" not in png.text["latentdiff"] + png.text["parameters"]


def test_png_info_reads_back_what_the_response_carries():
    encoded = encode_png(gradient(32, 48), PARAMS)
    out = png_info({"image": "data:image/png;base64," + encoded}, max_bytes=1_000_000)
    assert out["info"].startswith("a red circle <lora:detail:0.8>\nNegative prompt: blue\nSteps: 7")
    assert json.loads(out["items"]["latentdiff"])["steps"] == 7
    assert (out["parameters"]["Prompt"], out["parameters"]["Steps"], out["parameters"]["Size-1"],
            out["parameters"]["Size-2"]) == ("a red circle <lora:detail:0.8>", "7", "32", "48")
    plain = png_info({"image": b64png(gradient(8, 8))}, max_bytes=1_000_000)
    assert plain == {"info": "", "items": {}, "parameters": {}}
    with pytest.raises(RequestError) as error:
        png_info({"image": "@@"}, max_bytes=1000)
    assert error.value.field == "image"


def test_decode_image_bounds_pixels_before_decoding():
    small = b64png(gradient(64, 64))
    with pytest.raises(RequestError) as error:
        decode_image(small, field="x", max_bytes=100_000, max_pixels=64 * 63)
    assert error.value.field == "x" and "pixels" in error.value.expected


# ---- the lists ----------------------------------------------------------------------------------------------------
def test_sampler_and_scheduler_lists_hold_names_the_parser_accepts():
    samplers = a1111_results.samplers()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LMS", "Heun", "DPM++ 2M SDE Heun"} <= set(names)
    for s in samplers:
        resolved = resolve_sampler(s["name"])
        assert resolved.name == s["aliases"][0] and resolved.schedule == s["options"].get("scheduler", (
            resolved.schedule))
    for row in a1111_results.schedulers():
        assert resolve_schedule(row["name"]) == resolve_schedule(row["label"])
    assert {m["name"] for m in a1111_results.latent_upscale_modes()} == {"Latent", "Latent (nearest)"}
    assert [u["name"] for u in a1111_results.upscalers()] == ["None", "Lanczos"]


def test_clip_skip_beyond_the_text_encoder_is_ignored_as_an_option_and_refused_as_an_override():
    options = Options(model="shapes-64", clip_skip=2)
    r = txt({"width": 64, "height": 64}, options=options, defaults=Defaults(clip_layers=None))
    assert (r.clip_skip, r.ignored) == (None, ("options.CLIP_stop_at_last_layers",))
    assert txt({"width": 64, "height": 64}, options=options, defaults=Defaults(clip_layers=12)).clip_skip == 2
    body = {"width": 64, "height": 64, "override_settings": {"CLIP_stop_at_last_layers": 3}}
    refused(lambda b: txt(b, defaults=Defaults(clip_layers=2)), body, "override_settings.CLIP_stop_at_last_layers")
    refused(lambda b: txt(b, defaults=Defaults(clip_layers=None)), body, "override_settings.CLIP_stop_at_last_layers")
