/** One line of the `bench:dataplane` table: ours against the raw baseline measured in the same run. */
export interface DataplaneRow {
  section: string;
  case: string;
  ours: number;
  baseline: number;
  unit: string;
  /** What the baseline is. */
  baselineName: string;
  /** The target, in words, and whether this run met it. */
  target: string;
  met: boolean;
}
