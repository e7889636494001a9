import { z } from 'zod';
import { CreateImageInput, Image, ImageIdInput, ImageLog, ImageNameInput, RestImage, toRestImage } from '../../shared/index.js';
import { authedProcedure, restView, router } from '../trpc/init.js';

const tags = ['Images'];
/** REST carries images with `orgId` always a string. */
export const restImage = restView(RestImage, toRestImage);
const restImages = restView(z.array(RestImage), (images: Image[]) => images.map(toRestImage));

export const imagesRouter = router({
  list: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/images', tags, summary: 'List the images you can use' }, message: 'Images fetched', envelope: 'bare', restView: restImages })
    .input(z.void())
    .output(z.array(Image))
    .query(({ ctx }) => ctx.services.images.list(ctx.principal)),

  create: authedProcedure
    .meta({
      openapi: {
        method: 'POST',
        path: '/images',
        tags,
        summary: 'Build an image from a recipe, or register an alias of a system image',
        description:
          'With only `name`, `version` and `path` it registers an alias of a system image (`path`, default `name`), as the original VoidRun does. With any recipe field (`base`, `packages`, `run`, `env`, `workdir`, `files`) it answers at once with the image `building` and builds it in the background: follow `status` and `progress` in `GET /images/{id}` and the log at `GET /images/{id}/logs` (live: `/images/{id}/logs/stream`). 409 IMAGE_NOT_READY when `base` is still building or failed; 429 past IMAGE_BUILDS_PER_ORG builds at once or when the org has no disk left (ORG_MAX_DISK_MB). See the README, "Images".',
      },
      message: 'Image created',
      successStatus: 201,
      envelope: 'both',
      restView: restImage,
    })
    .input(CreateImageInput)
    .output(Image)
    .mutation(({ ctx, input }) => ctx.services.images.create(ctx.principal, input)),

  get: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/images/{id}', tags, summary: 'Get an image (status, build progress, size)' }, message: 'Image fetched', envelope: 'bare', restView: restImage })
    .input(ImageIdInput)
    .output(Image)
    .query(({ ctx, input }) => ctx.services.images.get(ctx.principal, input.id)),

  buildLog: authedProcedure
    .meta({
      openapi: {
        method: 'GET',
        path: '/images/{id}/logs',
        tags,
        summary: "An image's build log",
        description: "The recipe build's output so far (its tail past IMAGE_BUILD_LOG_MAX_BYTES); empty for images not built from a recipe. Live: `GET /images/{id}/logs/stream` (Server-Sent Events) or the tRPC subscription `images.logs`.",
      },
      message: 'Image log fetched',
    })
    .input(ImageIdInput)
    .output(ImageLog)
    .query(({ ctx, input }) => ctx.services.images.logs(ctx.principal, input.id)),

  /** The build log's lines so far, then live ones until the build ends. */
  logs: authedProcedure.input(ImageIdInput).subscription(async function* ({ ctx, input, signal }) {
    const lines = await ctx.services.images.followLogs(ctx.principal, input.id, signal ?? new AbortController().signal);
    for await (const line of lines) yield line;
  }),

  delete: authedProcedure
    .meta({
      openapi: {
        method: 'DELETE',
        path: '/images/{id}',
        tags,
        summary: "Delete one of your organization's images",
        description: '403 for a system image; 409 while any sandbox uses it (delete those first). A build in progress is cancelled. Layers no image uses any more are removed by the layer GC.',
      },
      message: 'Image deleted',
    })
    .input(ImageIdInput)
    .output(z.object({ id: z.string(), deleted: z.literal(true) }))
    .mutation(({ ctx, input }) => ctx.services.images.delete(ctx.principal, input.id)),

  getByName: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/images/name/{name}', tags, summary: 'Get an image by name' }, message: 'Image fetched', envelope: 'bare', restView: restImage })
    .input(ImageNameInput)
    .output(Image)
    .query(({ ctx, input }) => ctx.services.images.getByName(ctx.principal, input.name)),
});
