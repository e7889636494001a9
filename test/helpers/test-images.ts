import type { Recipe } from '../../shared/schemas/images.js';

/**
 * The small image the image tests build on: python3-minimal on debian (~5 MB of packages). The
 * global setup builds it once per machine, so every test that builds this exact recipe finds its
 * layer in the cache (a test that adds a step builds only that step).
 */
export const TEST_IMAGE_RECIPE = { base: 'debian', packages: ['python3-minimal'] } as const satisfies Recipe & { base: string };
