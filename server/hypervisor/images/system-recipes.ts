import type { Recipe } from '../../../shared/schemas/images.js';

/**
 * System images made by the recipe builder rather than by debootstrap: each is a recipe on a
 * system rootfs (`imageRecipes` in rootfs-images.ts), built into content-addressed layers on first
 * use or by `npm run image:build -- <name>`. Bump nothing to rebuild: a changed recipe is a new
 * chain of layer ids, and the old layers go with the layer GC once no image uses them.
 */
export const systemRecipeImages = {
  code: {
    description: 'Debian 12 (bookworm) for running code: python3 with pip and venv, nodejs with npm, git, curl, gcc, make and the C library headers',
    recipe: {
      base: 'debian',
      // A lite toolchain: gcc, make and libc6-dev build C extensions (pip's sdists, node-gyp's C);
      // build-essential would add g++ and dpkg-dev (+18 MB, most of it g++).
      packages: ['python3', 'python3-pip', 'python3-venv', 'nodejs', 'npm', 'git', 'curl', 'ca-certificates', 'gcc', 'make', 'libc6-dev'],
      env: { PIP_BREAK_SYSTEM_PACKAGES: '1' },
    },
  },
} as const satisfies Record<string, { description: string; recipe: Recipe & { base: string } }>;

export type SystemRecipeImage = keyof typeof systemRecipeImages;

export function isSystemRecipeImage(name: string): name is SystemRecipeImage {
  return Object.hasOwn(systemRecipeImages, name);
}
