/** `decodeURIComponent`, or null when `text` has a malformed percent-escape (never a URIError). */
export function decodeOrNull(text: string): string | null {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}
