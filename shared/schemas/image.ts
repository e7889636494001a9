import { z } from 'zod';
import { Id, Timestamp } from './common.js';

export const Image = z
  .object({
    _id: Id,
    id: Id,
    name: z.string().meta({ example: 'debian' }),
    tag: z.string().meta({ example: 'latest' }),
    description: z.string(),
    system: z.boolean(),
    orgId: Id.nullable(),
    base: z.string().meta({ description: 'The buildable image this one is made from.' }),
    ready: z.boolean().meta({ description: 'Its root filesystem is built on this server.' }),
    createdAt: Timestamp,
    createdBy: Id,
  });
export type Image = z.infer<typeof Image>;

/** A system image's `orgId` on REST: the original VoidRun's empty ObjectId (the contract's `orgId` is a string). */
export const NO_ORG_ID = '000000000000000000000000';

/** An image as REST answers carry it: `orgId` always a string. */
export const RestImage = Image.extend({
  orgId: Id.meta({ description: `The owning org; ${NO_ORG_ID} for a system image, as the original VoidRun sends it.` }),
}).meta({ id: 'Image' });
export type RestImage = z.infer<typeof RestImage>;

/** `image` as REST shows it. */
export function toRestImage(image: Image): RestImage {
  return { ...image, orgId: image.orgId ?? NO_ORG_ID };
}

export const CreateImageInput = z
  .object({
    name: z.string().min(1).max(100).regex(/^[a-z0-9][a-z0-9._-]*$/, 'must be lowercase letters, digits, ".", "_" or "-"'),
    version: z.string().max(64).optional().meta({ description: 'Stored as the tag (default "latest").' }),
    path: z.string().optional().meta({ description: 'The buildable image to base it on (e.g. "debian"); defaults to `name`. Host paths are not accepted.' }),
  })
  .meta({ id: 'CreateImageRequest' });
export type CreateImageInput = z.infer<typeof CreateImageInput>;

export const ImageIdInput = z.object({ id: Id });
export const ImageNameInput = z.object({ name: z.string().min(1) });
