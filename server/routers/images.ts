import { z } from 'zod';
import { CreateImageInput, Image, ImageIdInput, ImageNameInput, RestImage, toRestImage } from '../../shared/index.js';
import { authedProcedure, restView, router } from '../trpc/init.js';

const tags = ['Images'];
/** REST carries images with `orgId` always a string. */
const restImage = restView(RestImage, toRestImage);
const restImages = restView(z.array(RestImage), (images: Image[]) => images.map(toRestImage));

export const imagesRouter = router({
  list: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/images', tags, summary: 'List the images you can use' }, message: 'Images fetched', envelope: 'bare', restView: restImages })
    .input(z.void())
    .output(z.array(Image))
    .query(({ ctx }) => ctx.services.images.list(ctx.principal)),

  create: authedProcedure
    .meta({
      openapi: { method: 'POST', path: '/images', tags, summary: 'Register an image for your organization', description: 'Based on an image this server can build (`path`, default `name`).' },
      message: 'Image created',
      successStatus: 201,
      envelope: 'both',
      restView: restImage,
    })
    .input(CreateImageInput)
    .output(Image)
    .mutation(({ ctx, input }) => ctx.services.images.create(ctx.principal, input)),

  get: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/images/{id}', tags, summary: 'Get an image' }, message: 'Image fetched', envelope: 'bare', restView: restImage })
    .input(ImageIdInput)
    .output(Image)
    .query(({ ctx, input }) => ctx.services.images.get(ctx.principal, input.id)),

  delete: authedProcedure
    .meta({ openapi: { method: 'DELETE', path: '/images/{id}', tags, summary: "Delete one of your organization's images" }, message: 'Image deleted' })
    .input(ImageIdInput)
    .output(z.object({ id: z.string(), deleted: z.literal(true) }))
    .mutation(({ ctx, input }) => ctx.services.images.delete(ctx.principal, input.id)),

  getByName: authedProcedure
    .meta({ openapi: { method: 'GET', path: '/images/name/{name}', tags, summary: 'Get an image by name' }, message: 'Image fetched', envelope: 'bare', restView: restImage })
    .input(ImageNameInput)
    .output(Image)
    .query(({ ctx, input }) => ctx.services.images.getByName(ctx.principal, input.name)),
});
