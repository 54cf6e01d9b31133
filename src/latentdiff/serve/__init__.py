"""`latentdiff serve`: an HTTP server speaking AUTOMATIC1111's `/sdapi/v1` subset and OpenAI's
`/v1/images/generations`, with a web page, over one job queue that batches compatible requests (docs/serving.md).

    settings.py   ServeSettings: the flags of `latentdiff serve` (limits, folders, auth)
    requests.py   ImageRequest: one validated generation request in latentdiff's terms, whatever API sent it
    models.py     ModelCatalog: checkpoints, VAEs, LoRAs, embeddings in the folders; an LRU of loaded pipelines
    render.py     render(pipe, units): the pipeline calls that make a batch of units' images
    preview.py    LatentPreview: a cheap latent -> RGB projection for the live preview
    engine.py     Engine: the queue, the batching worker, progress, interrupt / skip / cancel
    a1111.py      A1111 JSON -> ImageRequest; a1111_images.py base64 images in and PNGs out (no server paths);
                  a1111_results.py the {images, parameters, info} answers and the lists; routes_a1111.py its routes
    openai_api.py OpenAI's images endpoint and /v1/models
    app.py        create_app(settings): the FastAPI app (auth, body limits, errors as 422 JSON, the page)
    web/          the page served at / (plain HTML + JS, no build step)

The server stack (fastapi, uvicorn) is the optional extra `latentdiff[serve]`; nothing here is imported by the
library below it.
"""
