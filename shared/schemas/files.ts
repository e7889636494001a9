import { z } from 'zod';
import { AgentText, Id, PathText, Timestamp } from './common.js';

/** A path inside the sandbox; relative paths resolve against the sandbox user's home (/root). */
export const SandboxPath = PathText.min(1, 'must not be empty').meta({ example: '/root/file.txt' });

export const FileInfo = z
  .object({
    name: z.string(),
    path: z.string(),
    size: z.number().int(),
    mode: z.string().meta({ description: 'Permission bits in octal', example: '0644' }),
    isDir: z.boolean(),
    isSymlink: z.boolean(),
    modTime: Timestamp,
  })
  .meta({ id: 'FileInfo' });
export type FileInfo = z.infer<typeof FileInfo>;

/** A file's type as `stat -c %F` names it. */
export const FileType = z.enum(['regular file', 'regular empty file', 'directory', 'symbolic link', 'fifo', 'socket', 'character special file', 'block special file']);
export type FileType = z.infer<typeof FileType>;

export const FileStats = FileInfo.extend({ uid: z.number().int(), gid: z.number().int(), linkTarget: z.string().nullable(), type: FileType }).meta({ id: 'FileStats' });
export type FileStats = z.infer<typeof FileStats>;

export const DiskUsage = z
  .object({ path: z.string(), size: z.number().int().meta({ description: 'Bytes on disk, as du counts them' }), humanReadable: z.string().meta({ example: '1.5 GB' }) })
  .meta({ id: 'DiskUsage' });
export type DiskUsage = z.infer<typeof DiskUsage>;

/**
 * The original VoidRun answered most file operations with an exec result; existing clients read
 * `stdout`. Every file operation answers that shape (`stdout`, `stderr`, `exitCode`) plus its
 * structured result.
 */
const execShape = { stdout: z.string(), stderr: z.string(), exitCode: z.number().int() };

export const FileOpResult = z.object({ ...execShape, path: z.string() }).meta({ id: 'FileOpResult' });
export type FileOpResult = z.infer<typeof FileOpResult>;
export const StatResult = z.object({ ...execShape, ...FileStats.shape }).meta({ id: 'StatResult' });
export type StatResult = z.infer<typeof StatResult>;
export const DiskUsageResult = z.object({ ...execShape, ...DiskUsage.shape }).meta({ id: 'DiskUsageResult' });
export type DiskUsageResult = z.infer<typeof DiskUsageResult>;
export const HeadTailResult = z.object({ ...execShape, path: z.string(), content: z.string(), lines: z.number().int() }).meta({ id: 'HeadTailResult' });
export type HeadTailResult = z.infer<typeof HeadTailResult>;
export const SearchResult = z
  .object({ ...execShape, path: z.string(), matches: z.array(z.string()), truncated: z.boolean().meta({ description: 'More matches exist than the 10,000 returned' }) })
  .meta({ id: 'SearchResult' });
export type SearchResult = z.infer<typeof SearchResult>;
export const ArchiveResult = z.object({ ...execShape, path: z.string(), archive: z.string() }).meta({ id: 'ArchiveResult' });
export type ArchiveResult = z.infer<typeof ArchiveResult>;
export const ExtractResult = z.object({ ...execShape, path: z.string(), entries: z.number().int() }).meta({ id: 'ExtractResult' });
export type ExtractResult = z.infer<typeof ExtractResult>;
export const FileList = z.object({ success: z.literal(true), files: z.array(FileInfo) }).meta({ id: 'FileList' });
export type FileList = z.infer<typeof FileList>;
export const UploadResult = z.object({ path: z.string(), size: z.number().int() }).meta({ id: 'UploadResult' });
export type UploadResult = z.infer<typeof UploadResult>;

/** What a tar upload (`POST /sandboxes/{id}/files/upload-tar`) wrote under its directory. */
export const UploadTarResult = z
  .object({
    path: z.string().meta({ description: 'The directory the entries were written under' }),
    files: z.number().int().min(0),
    directories: z.number().int().min(0),
    symlinks: z.number().int().min(0),
    size: z.number().int().min(0).meta({ description: "The files' bytes in total" }),
  })
  .meta({ id: 'UploadTarResult' });
export type UploadTarResult = z.infer<typeof UploadTarResult>;

export const ArchiveFormat = z.enum(['tar', 'tar.gz', 'tar.bz2', 'zip'], { error: 'must be tar, tar.gz, tar.bz2 or zip' });
export type ArchiveFormat = z.infer<typeof ArchiveFormat>;

export const PathInput = z.object({ id: Id, path: SandboxPath });
export const FromToInput = z.object({ id: Id, from: SandboxPath, to: SandboxPath });
export const CreateFileInput = PathInput.extend({ content: z.string().optional().meta({ description: 'The new file\'s content (default empty)' }) });
export const ChmodInput = PathInput.extend({ mode: z.string().regex(/^[0-7]{3,4}$/, 'must be 3 or 4 octal digits, like 755 or 0644') });
export const HeadTailInput = PathInput.extend({
  lines: z.number().int().min(1, 'must be 1 or more').max(100_000, 'must be at most 100000').default(10),
  head: z.boolean().default(true).meta({ description: 'true: the first lines; false: the last lines' }),
});
export const SearchInput = PathInput.extend({ pattern: AgentText.min(1).max(1024).meta({ description: 'A glob on file names (*, ? and [...]); a pattern without those matches as a substring of the name, as `*pattern*`', example: '*.log' }) });
export const CompressInput = PathInput.extend({ format: ArchiveFormat.default('tar.gz') });
export const ExtractInput = z.object({ id: Id, archive: SandboxPath, dest: SandboxPath });

export const WatchInput = z.object({
  id: Id,
  path: SandboxPath,
  recursive: z.boolean().default(false),
  ignoreHidden: z.boolean().default(true).meta({ description: "Skip files and directories whose names start with '.'" }),
});
export type WatchInput = z.infer<typeof WatchInput>;

export const FileEvent = z
  .object({
    type: z.enum(['created', 'modified', 'deleted', 'renamed', 'chmod']),
    path: z.string(),
    oldPath: z.string().optional(),
    size: z.number().int().optional(),
    timestamp: Timestamp,
  })
  .meta({ id: 'FileEvent' });
export type FileEvent = z.infer<typeof FileEvent>;

/** What a watch stream carries: file events, and a notice when events were dropped for a slow reader. */
export const WatchMessage = z.union([
  FileEvent,
  z.object({ type: z.literal('overflow'), dropped: z.number().int(), timestamp: Timestamp }),
]);
export type WatchMessage = z.infer<typeof WatchMessage>;

export const WatchSession = z.object({ sessionId: z.string().meta({ format: 'uuid' }) }).meta({ id: 'WatchSession' });
export const WatchSessionInfo = z
  .object({
    id: z.string().meta({ format: 'uuid' }),
    path: z.string(),
    createdAt: Timestamp,
    clients: z.number().int().meta({ description: 'Clients attached now' }),
  })
  .meta({ id: 'WatchSessionInfo' });
export type WatchSessionInfo = z.infer<typeof WatchSessionInfo>;
export const WatchSessionList = z.object({ sessions: z.array(WatchSessionInfo) }).meta({ id: 'WatchSessionList' });
