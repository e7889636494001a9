import { z } from 'zod';
import { AgentText, Id, PathText, Timestamp, utf8Length } from './common.js';
import { EnvVars } from './sandbox.js';

/** Bounds of a recipe: big enough for any real image, small enough that one request cannot hold the server. */
export const MAX_RECIPE_PACKAGES = 200;
export const MAX_RECIPE_RUN = 50;
export const MAX_RECIPE_RUN_BYTES = 16 * 1024;
export const MAX_RECIPE_FILES_BYTES = 4 * 1024 * 1024;

/**
 * An apt package name as Debian policy allows it (lowercase, digits, `+ - .`, at least two
 * characters), not ending in `-` (apt's "remove" suffix). apt still reads a name with `.` or `+`
 * that is not an exact package name as a regex, so a download also checks each name is one.
 */
export const APT_PACKAGE_NAME = /^[a-z0-9][a-z0-9+.-]*[a-z0-9+.]$/;

/** An apt package name as Debian policy defines it (no version pins, no options, no `-` remove suffix: the host hands it to apt, which also checks it is an exact name). */
export const AptPackageName = z
  .string()
  .max(100)
  .regex(APT_PACKAGE_NAME, 'must be an exact Debian package name: two or more lowercase letters, digits, "+", "-" or ".", not ending in "-" (like python3-minimal); patterns are refused');

/** An absolute path inside the image, without `..` components (the builder writes it through the build sandbox's agent). */
export const ImagePath = PathText.refine((p) => p.startsWith('/'), 'must be an absolute path (start with /)').refine(
  (p) => !p.split('/').includes('..'),
  'must not contain ".." components',
);

export const RecipeFile = z.object({
  path: ImagePath.refine((p) => p !== '/' && !p.endsWith('/'), 'must name a file, not a directory'),
  content: z.string().meta({ description: 'The file\'s text (UTF-8).' }),
  mode: z
    .string()
    .regex(/^0?[0-7]{3,4}$/, 'must be an octal file mode like "0644" or "0755"')
    .optional()
    .meta({ description: 'Octal permission bits; default "0644".', example: '0755' }),
});
export type RecipeFile = z.infer<typeof RecipeFile>;

/**
 * What a built image is made of. Each step becomes one cached layer: `packages` (one layer), `files`
 * (one layer), then one layer per `run` command; `env` and `workdir` are image config.
 */
export const RecipeFields = {
  base: z.string().min(1).max(100).optional().meta({ description: 'The image to build on: "debian" (default), another system image, or one of your images (name or id).', example: 'debian' }),
  packages: z.array(AptPackageName).max(MAX_RECIPE_PACKAGES).optional().meta({ description: `Debian packages to install (from DEBIAN_MIRROR), at most ${MAX_RECIPE_PACKAGES}.`, example: ['python3-minimal'] }),
  run: z
    .array(AgentText.refine((s) => utf8Length(s) <= MAX_RECIPE_RUN_BYTES, `each command must be at most ${MAX_RECIPE_RUN_BYTES / 1024} KiB`))
    .max(MAX_RECIPE_RUN)
    .optional()
    .meta({ description: `Shell commands (sh -c) run in order as the build sandbox's root, at most ${MAX_RECIPE_RUN}; a non-zero exit fails the build.`, example: ['mkdir -p /srv/app'] }),
  env: EnvVars.optional().meta({ description: 'Environment every sandbox of the image sees (under the create request\'s envVars); also set for the build\'s run steps.' }),
  workdir: ImagePath.optional().meta({ description: 'The default working directory of commands in the image\'s sandboxes.', example: '/srv/app' }),
  files: z
    .array(RecipeFile)
    .max(1000)
    .optional()
    .refine((files) => (files ?? []).reduce((n, f) => n + utf8Length(f.content), 0) <= MAX_RECIPE_FILES_BYTES, `files' contents must total at most ${MAX_RECIPE_FILES_BYTES / 1024 / 1024} MiB`)
    .meta({ description: 'Files written into the image (one layer).' }),
};

export const Recipe = z.object(RecipeFields).meta({ id: 'ImageRecipe' });
export type Recipe = z.infer<typeof Recipe>;

/** The recipe fields of a create request: any of them makes it a build, not an alias. */
export const RECIPE_KEYS = Object.keys(RecipeFields) as Array<keyof Recipe>;

export const ImageStatus = z.enum(['building', 'ready', 'failed']);
export type ImageStatus = z.infer<typeof ImageStatus>;
export const ImageSource = z.enum(['system', 'alias', 'recipe', 'sandbox', 'import']);
export type ImageSource = z.infer<typeof ImageSource>;
export const ImageProgress = z.object({ step: z.number().int(), steps: z.number().int(), message: z.string() });
export type ImageProgress = z.infer<typeof ImageProgress>;

export const Image = z.object({
  _id: Id,
  id: Id,
  name: z.string().meta({ example: 'debian' }),
  tag: z.string().meta({ example: 'latest' }),
  description: z.string(),
  system: z.boolean(),
  orgId: Id.nullable(),
  base: z.string().meta({ description: 'The system root filesystem at the bottom of the image ("debian"; "" for an imported image).' }),
  ready: z.boolean().meta({ description: 'Sandboxes can be created from it now: built, and its root filesystem is on this server.' }),
  status: ImageStatus.meta({ description: '`building` while a recipe builds, then `ready` or `failed` (see `error` and the build log).' }),
  source: ImageSource.meta({ description: 'How it was made: a system image, an alias of one, a recipe build, a sandbox snapshot, or an OCI import.' }),
  parentId: Id.nullable().meta({ description: 'The image it was built on (recipe `base`, or the sandbox\'s image).' }),
  layerCount: z.number().int().meta({ description: 'Filesystem layers above `base`.' }),
  sizeBytes: z.number().int().meta({ description: 'Disk used by its own layers (not its parent\'s); counts against your org\'s disk quota.' }),
  progress: ImageProgress.nullable().meta({ description: 'While building: the step running (1-based) of how many, and what it does.' }),
  error: z.string().nullable().meta({ description: 'Why the build failed, when `status` is `failed`.' }),
  env: z.record(z.string(), z.string()),
  workdir: z.string().nullable(),
  recipe: Recipe.nullable(),
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

export const ImageName = z.string().min(1).max(100).regex(/^[a-z0-9][a-z0-9._-]*$/, 'must be lowercase letters, digits, ".", "_" or "-"');

export const CreateImageInput = z
  .object({
    name: ImageName,
    version: z.string().max(64).optional().meta({ description: 'Stored as the tag (default "latest").' }),
    path: z.string().optional().meta({ description: 'Registration of an alias only (no recipe fields): the system image to base it on (e.g. "debian"); defaults to `name`. Host paths are not accepted.' }),
    ...RecipeFields,
  })
  .meta({ id: 'CreateImageRequest', description: 'With only `name`, `version` and `path` it registers an alias of a system image; with any recipe field it builds an image in the background.' });
export type CreateImageInput = z.infer<typeof CreateImageInput>;

/** `POST /sandboxes/{id}/image`: the sandbox's filesystem as a new image of your org. */
export const SandboxImageInput = z.object({
  id: Id,
  name: ImageName,
  version: z.string().max(64).optional().meta({ description: 'Stored as the tag (default "latest").' }),
});
export type SandboxImageInput = z.infer<typeof SandboxImageInput>;

export const ImageIdInput = z.object({ id: Id });
export const ImageNameInput = z.object({ name: z.string().min(1) });

export const ImageLog = z.object({
  id: Id,
  status: ImageStatus,
  log: z.string().meta({ description: 'The build log (its tail, when it is longer than the server keeps).' }),
  truncated: z.boolean(),
});
export type ImageLog = z.infer<typeof ImageLog>;
